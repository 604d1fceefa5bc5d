-- Replicas: several cfaudit processes on one database divide the streams among themselves.
-- Each process holds its leases as advisory locks on one session connection; a lock lives
-- exactly as long as that connection, so who is alive and who holds what is read from
-- pg_locks, never from a heartbeat that could lie.

-- Whether the session-level advisory lock named `lock_name` (the text hashed into the bigint
-- key every cfaudit lock takes) is held by some live session of this database. A bigint key
-- shows in pg_locks as its high half in classid, its low half in objid, objsubid 1.
CREATE OR REPLACE FUNCTION cfaudit_lock_held(lock_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = ((hashtextextended(lock_name, 0) >> 32) & 4294967295)::oid
      AND l.objid = (hashtextextended(lock_name, 0) & 4294967295)::oid)
$$;

-- The service replicas that ever ran; the live ones hold the lock 'cfaudit.replica.<name>'.
CREATE TABLE IF NOT EXISTS cfaudit_replicas (
  name          TEXT PRIMARY KEY,
  -- Digest of the streams the replica is configured to collect: streams are balanced only
  -- among replicas with the same configuration.
  config_digest TEXT NOT NULL,
  -- When a replica of this name first joined.
  started_at    TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- Every lease ever taken: which process held which token of a stream. With the token on each
-- committed file, it shows that no stream was ever committed by two processes at once.
CREATE TABLE IF NOT EXISTS cfaudit_lease_log (
  stream      TEXT NOT NULL,
  lease_token BIGINT NOT NULL,
  holder      TEXT NOT NULL,
  taken_at    TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  PRIMARY KEY (stream, lease_token)
);

ALTER TABLE cfaudit_parquet_files ADD COLUMN IF NOT EXISTS lease_token BIGINT;
COMMENT ON COLUMN cfaudit_parquet_files.lease_token IS
  'The lease the committing process held (cfaudit_lease_log); NULL for files committed before it was recorded.';
