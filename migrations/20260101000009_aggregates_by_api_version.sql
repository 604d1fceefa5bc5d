-- The dashboards' aggregates gain what the v2 API makes possible, under the same names:
--   audit_events_hourly  + api_version, resource_product (activity by product)
--   audit_actors_hourly  + api_version, logins, failed_logins (logins by actor and IP)
-- An aggregate's columns cannot be changed in place, so both are dropped and created again.
-- On TimescaleDB they come back WITH NO DATA and real-time: until materialized, their hours
-- are computed from audit_logs at query time (correct, slower); the refresh policy
-- materializes the last 3 days and `cfaudit run` everything older at its next start
-- (refresh_settled_aggregates), once. On plain PostgreSQL they are views, always current.
-- Guarded: applying this file twice changes nothing.

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_name = 'audit_events_hourly' AND column_name = 'api_version') THEN
      DROP MATERIALIZED VIEW IF EXISTS audit_events_hourly;
      CREATE MATERIALIZED VIEW audit_events_hourly WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 hour', timestamp) AS bucket,
               account_id, api_version, action_type, action_result, resource_type,
               resource_product,
               count(*) AS events
        FROM audit_logs
        GROUP BY 1, 2, 3, 4, 5, 6, 7
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_events_hourly',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
      ALTER MATERIALIZED VIEW audit_events_hourly SET (timescaledb.materialized_only = false);
    END IF;

    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_name = 'audit_actors_hourly' AND column_name = 'api_version') THEN
      DROP MATERIALIZED VIEW IF EXISTS audit_actors_hourly;
      CREATE MATERIALIZED VIEW audit_actors_hourly WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 hour', timestamp) AS bucket,
               account_id, api_version, actor_email, actor_type, ip_address,
               count(*) AS events,
               count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed_events,
               count(*) FILTER (WHERE action_type = 'login') AS logins,
               count(*) FILTER (WHERE action_type = 'login'
                                  AND action_result IN ('false', 'failure')) AS failed_logins
        FROM audit_logs
        GROUP BY 1, 2, 3, 4, 5, 6
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_actors_hourly',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
      ALTER MATERIALIZED VIEW audit_actors_hourly SET (timescaledb.materialized_only = false);
    END IF;
  ELSE
    DROP VIEW IF EXISTS audit_events_hourly;
    CREATE VIEW audit_events_hourly AS
      SELECT date_trunc('hour', timestamp) AS bucket,
             account_id, api_version, action_type, action_result, resource_type,
             resource_product,
             count(*) AS events
      FROM audit_logs
      GROUP BY 1, 2, 3, 4, 5, 6, 7;

    DROP VIEW IF EXISTS audit_actors_hourly;
    CREATE VIEW audit_actors_hourly AS
      SELECT date_trunc('hour', timestamp) AS bucket,
             account_id, api_version, actor_email, actor_type, ip_address,
             count(*) AS events,
             count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed_events,
             count(*) FILTER (WHERE action_type = 'login') AS logins,
             count(*) FILTER (WHERE action_type = 'login'
                                AND action_result IN ('false', 'failure')) AS failed_logins
      FROM audit_logs
      GROUP BY 1, 2, 3, 4, 5, 6;
  END IF;
END
$$;

COMMENT ON COLUMN audit_actors_hourly.logins IS
  'Events whose action_type is login (v2 records logins; v1 rarely), and of them those that failed in failed_logins.';
