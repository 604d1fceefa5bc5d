-- cfaudit schema. Runs on plain PostgreSQL 15+ and on TimescaleDB 2.x; every statement is
-- idempotent, so applying this file twice changes nothing.

-- The table of the original spec (design-notes §1).
CREATE TABLE IF NOT EXISTS audit_logs (
  event_id       TEXT        NOT NULL,
  timestamp      TIMESTAMPTZ NOT NULL,
  account_id     TEXT,
  actor_email    TEXT,
  actor_type     TEXT,
  action_type    TEXT,
  action_result  TEXT,
  resource_type  TEXT,
  resource_id    TEXT,
  ip_address     INET,
  metadata       JSONB,
  raw_event      JSONB,
  ingestion_time TIMESTAMPTZ DEFAULT NOW(),
  PRIMARY KEY (timestamp, event_id)
);

CREATE INDEX IF NOT EXISTS audit_logs_account_time_idx ON audit_logs (account_id, timestamp DESC);

-- One row per account: the committed checkpoint and the ids of the safety-lag overlap, written
-- in the same transaction as the dead letters and the staged files of the batch it commits.
CREATE TABLE IF NOT EXISTS cfaudit_checkpoints (
  account_id  TEXT        PRIMARY KEY,
  checkpoint  TIMESTAMPTZ,
  overlap_ids JSONB       NOT NULL DEFAULT '[]',
  commit_seq  BIGINT      NOT NULL DEFAULT 0,
  updated_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- Events that could not be mapped. The same bad event seen again (overlap) is stored once.
CREATE TABLE IF NOT EXISTS cfaudit_dead_letters (
  id         BIGSERIAL   PRIMARY KEY,
  account_id TEXT        NOT NULL,
  reason     TEXT        NOT NULL,
  raw_event  TEXT        NOT NULL,
  raw_md5    TEXT        GENERATED ALWAYS AS (md5(raw_event)) STORED,
  first_seen TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  UNIQUE (account_id, raw_md5)
);

-- Parquet files: recorded with their final name when their batch commits, marked published
-- once visible in the dataset. Rows with published_at NULL are published at start-up.
CREATE TABLE IF NOT EXISTS cfaudit_parquet_files (
  final_path   TEXT        PRIMARY KEY,
  account_id   TEXT        NOT NULL,
  commit_seq   BIGINT      NOT NULL,
  staged_path  TEXT        NOT NULL,
  partition    TEXT        NOT NULL,
  rows         BIGINT      NOT NULL,
  bytes        BIGINT      NOT NULL,
  committed_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  published_at TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS cfaudit_parquet_files_unpublished_idx
  ON cfaudit_parquet_files (account_id) WHERE published_at IS NULL;

-- TimescaleDB, only where the extension is installed and preloaded: audit_logs becomes a
-- hypertable with 1-day chunks. On plain PostgreSQL this block does nothing.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
     AND coalesce(current_setting('shared_preload_libraries', true), '') LIKE '%timescaledb%' THEN
    CREATE EXTENSION IF NOT EXISTS timescaledb;
    PERFORM create_hypertable('audit_logs', 'timestamp',
                              chunk_time_interval => INTERVAL '1 day',
                              if_not_exists => TRUE,
                              migrate_data => TRUE);
  END IF;
END
$$;
