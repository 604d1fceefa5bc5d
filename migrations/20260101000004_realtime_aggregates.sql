-- TimescaleDB 2.13+ creates continuous aggregates materialized-only: the dashboards would miss
-- the hours the refresh policy has not reached yet. Real-time aggregation adds them at query
-- time. Hours older than the policy's window (3 days) are materialized by `cfaudit backfill`
-- and `cfaudit replay`, which refresh the aggregates over the range they wrote.
-- Plain PostgreSQL: the names are views over audit_logs, always current; nothing to do.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    ALTER MATERIALIZED VIEW audit_events_hourly SET (timescaledb.materialized_only = false);
    ALTER MATERIALIZED VIEW audit_actors_hourly SET (timescaledb.materialized_only = false);
  END IF;
END
$$;
