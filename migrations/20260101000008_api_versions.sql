-- Both audit-log APIs in one table: `api_version` says which one an event came from (rows
-- already here are v1), and the fields an investigator filters on beyond the original
-- columns get columns of their own: v2's, and those v1 has too (actor id, zone name), filled
-- from both. Adding nullable columns, or one with a constant default, rewrites nothing (on
-- TimescaleDB neither, compressed chunks included). Guarded: applying this file twice changes
-- nothing.
ALTER TABLE audit_logs
  ADD COLUMN IF NOT EXISTS api_version        TEXT NOT NULL DEFAULT 'v1',
  ADD COLUMN IF NOT EXISTS actor_id           TEXT,
  ADD COLUMN IF NOT EXISTS actor_context      TEXT,
  ADD COLUMN IF NOT EXISTS actor_token_id     TEXT,
  ADD COLUMN IF NOT EXISTS actor_token_name   TEXT,
  ADD COLUMN IF NOT EXISTS action_description TEXT,
  ADD COLUMN IF NOT EXISTS resource_product   TEXT,
  ADD COLUMN IF NOT EXISTS resource_scope     TEXT,
  ADD COLUMN IF NOT EXISTS zone_id            TEXT,
  ADD COLUMN IF NOT EXISTS zone_name          TEXT,
  ADD COLUMN IF NOT EXISTS raw_method         TEXT,
  ADD COLUMN IF NOT EXISTS raw_uri            TEXT,
  ADD COLUMN IF NOT EXISTS raw_cf_ray_id      TEXT,
  ADD COLUMN IF NOT EXISTS raw_user_agent     TEXT,
  ADD COLUMN IF NOT EXISTS raw_status_code    INTEGER;

COMMENT ON COLUMN audit_logs.api_version IS
  'Which Cloudflare audit-log API the event came from: v1 (/audit_logs) or v2 (/logs/audit). The two are different record sets: the same action has a different id in each.';

-- Whether an event is in the dataset's event index. The insert into audit_logs asks this of a
-- conflicting row; asked through a subquery instead, TimescaleDB (2.28) fails with "SubPlan found
-- with no parent plan" when the row sits in a compressed chunk of a table that gained a column
-- with a default (as api_version above). A PL/pgSQL function is never inlined, so the insert's
-- plan has no subplan there; STABLE: it reads with the calling statement's snapshot, as the
-- subquery did.
CREATE OR REPLACE FUNCTION cfaudit_in_lake(event_time TIMESTAMPTZ, event_id TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM cfaudit_lake_events l
                 WHERE l.event_time = cfaudit_in_lake.event_time
                   AND l.event_id = cfaudit_in_lake.event_id);
END
$$;
