-- Exactly once under every input and timing: the dataset's event index, stream leases, the
-- state of newest-first sweeps, and dead letters kept as bytes. Every statement is guarded:
-- applying this file twice changes nothing.

-- Every event committed to the Parquet dataset, by id, whatever stream committed it and
-- whatever safety lag was in force. A later sweep over it (a raised lag, a second stream, a
-- second process) recognises it here, and a commit that would write it again is refused. Rows
-- older than the API's 18-month retention can never come back and are pruned.
CREATE TABLE IF NOT EXISTS cfaudit_lake_events (
  event_id   TEXT        PRIMARY KEY,
  event_time TIMESTAMPTZ NOT NULL,
  stream     TEXT        NOT NULL,
  commit_seq BIGINT      NOT NULL
);

-- The lease of a stream: one process at a time holds it (a PostgreSQL advisory lock on its
-- own connection), and every write and commit is fenced on lease_token, which each new holder
-- increments.
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS lease_token  BIGINT NOT NULL DEFAULT 0;
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS lease_holder TEXT;
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS leased_at    TIMESTAMPTZ;
-- A newest-first sweep cut short: {since, before, top, newest}; resumed by the next one.
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS unfinished_sweep JSONB;
-- The end of the last sweep that reached the end of its window.
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS swept_until TIMESTAMPTZ;

-- Existing installations: the index starts with what is committed. Every event of a stream
-- older than its checkpoint is committed to both sinks (the checkpoint only moves past
-- committed batches), and the overlap ids held the committed events at and after it.
INSERT INTO cfaudit_lake_events (event_id, event_time, stream, commit_seq)
SELECT o.id, o."when", c.account_id, c.commit_seq
FROM cfaudit_checkpoints c,
     LATERAL jsonb_to_recordset(c.overlap_ids) AS o(id TEXT, "when" TIMESTAMPTZ)
WHERE c.overlap_ids <> '[]'::jsonb
ON CONFLICT (event_id) DO NOTHING;

INSERT INTO cfaudit_lake_events (event_id, event_time, stream, commit_seq)
SELECT a.event_id, a.timestamp, c.account_id, c.commit_seq
FROM cfaudit_checkpoints c
JOIN audit_logs a
  ON a.account_id = split_part(c.account_id, '.', 1)
 AND a.timestamp < c.checkpoint
 AND a.timestamp >= coalesce(c.covers_since, '-infinity')
 AND a.timestamp < coalesce(c.covers_until, 'infinity')
 AND a.timestamp >= now() - INTERVAL '550 days'
WHERE c.checkpoint IS NOT NULL
ON CONFLICT (event_id) DO NOTHING;

UPDATE cfaudit_checkpoints SET overlap_ids = '[]'::jsonb WHERE overlap_ids <> '[]'::jsonb;

-- Dead letters keep the exact bytes received (an unreadable event need not be UTF-8); the
-- text column holds a readable copy. The same bad event seen again is stored once.
ALTER TABLE cfaudit_dead_letters ADD COLUMN IF NOT EXISTS raw_bytes BYTEA;
UPDATE cfaudit_dead_letters SET raw_bytes = convert_to(raw_event, 'UTF8') WHERE raw_bytes IS NULL;
ALTER TABLE cfaudit_dead_letters ALTER COLUMN raw_bytes SET NOT NULL;
ALTER TABLE cfaudit_dead_letters DROP COLUMN IF EXISTS raw_md5;
CREATE UNIQUE INDEX IF NOT EXISTS cfaudit_dead_letters_raw_idx
  ON cfaudit_dead_letters (account_id, md5(raw_bytes));
