-- Migration 16 dropped migration 14's partial index for the logins panel by its name alone.
-- On TimescaleDB that index lives beside the aggregate's materialized table, outside the
-- search path, so it stayed (and was kept up at every refresh, read by nothing). Dropped here
-- wherever it is (TimescaleDB drops the chunks' copies with it). Guarded: applying this file
-- twice changes nothing.
DO $$
DECLARE
  logins_index REGCLASS;
BEGIN
  SELECT c.oid::regclass INTO logins_index
  FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
  WHERE c.relname = 'audit_actors_daily_logins_idx';
  IF logins_index IS NOT NULL THEN
    EXECUTE format('DROP INDEX %s', logins_index);
  END IF;
END
$$;
