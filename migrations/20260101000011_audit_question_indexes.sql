-- Indexes for the questions an investigator asks of audit_logs: what one actor did, everything
-- from one IP address, the history of one resource, the events of one zone, failed actions.
-- Each leads with what is asked about and ends with the time, newest first, so "the newest N
-- in a window" reads only the rows it returns. The failed actions are a small share of all:
-- a partial index on time holds only them.
-- On TimescaleDB each chunk gets them (compressed chunks keep their own segment indexes).
-- Idempotent: applying this file twice changes nothing.

CREATE INDEX IF NOT EXISTS audit_logs_actor_time_idx ON audit_logs (actor_email, timestamp DESC);
CREATE INDEX IF NOT EXISTS audit_logs_ip_time_idx ON audit_logs (ip_address, timestamp DESC);
CREATE INDEX IF NOT EXISTS audit_logs_resource_time_idx ON audit_logs (resource_id, timestamp DESC);
CREATE INDEX IF NOT EXISTS audit_logs_zone_time_idx ON audit_logs (zone_name, timestamp DESC);
CREATE INDEX IF NOT EXISTS audit_logs_failed_time_idx ON audit_logs (timestamp DESC)
  WHERE action_result IN ('false', 'failure');
