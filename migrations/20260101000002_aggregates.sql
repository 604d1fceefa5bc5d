-- The aggregates the dashboards read, under the same names on both databases:
--   audit_events_hourly  events per hour by account, action type, result and resource type
--   audit_actors_hourly  events per hour by account and actor (e-mail, type, IP), failures apart
-- On TimescaleDB they are continuous aggregates (created WITH NO DATA, filled by their refresh
-- policies) and audit_logs gets its compression settings; the compression and retention
-- *policies* are applied at start-up from the configuration (TIMESCALE_COMPRESS_AFTER_DAYS,
-- RETENTION_DAYS), so changing them needs no migration. On plain PostgreSQL they are plain
-- views over audit_logs. Every statement is guarded: applying this file twice changes nothing.

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                   WHERE hypertable_name = 'audit_logs' AND compression_enabled) THEN
      ALTER TABLE audit_logs SET (timescaledb.compress,
                                  timescaledb.compress_segmentby = 'account_id',
                                  timescaledb.compress_orderby = 'timestamp DESC');
    END IF;

    IF to_regclass('audit_events_hourly') IS NULL THEN
      CREATE MATERIALIZED VIEW audit_events_hourly WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 hour', timestamp) AS bucket,
               account_id, action_type, action_result, resource_type,
               count(*) AS events
        FROM audit_logs
        GROUP BY 1, 2, 3, 4, 5
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_events_hourly',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
    END IF;

    IF to_regclass('audit_actors_hourly') IS NULL THEN
      CREATE MATERIALIZED VIEW audit_actors_hourly WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 hour', timestamp) AS bucket,
               account_id, actor_email, actor_type, ip_address,
               count(*) AS events,
               count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed_events
        FROM audit_logs
        GROUP BY 1, 2, 3, 4, 5
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_actors_hourly',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
    END IF;
  ELSE
    CREATE OR REPLACE VIEW audit_events_hourly AS
      SELECT date_trunc('hour', timestamp) AS bucket,
             account_id, action_type, action_result, resource_type,
             count(*) AS events
      FROM audit_logs
      GROUP BY 1, 2, 3, 4, 5;

    CREATE OR REPLACE VIEW audit_actors_hourly AS
      SELECT date_trunc('hour', timestamp) AS bucket,
             account_id, actor_email, actor_type, ip_address,
             count(*) AS events,
             count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed_events
      FROM audit_logs
      GROUP BY 1, 2, 3, 4, 5;
  END IF;
END
$$;
