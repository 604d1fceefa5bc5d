-- Streams: each row of cfaudit_checkpoints is one stream of an account. The live stream's key is
-- the account id; each `cfaudit backfill` range has its own key, `<account>.backfill.<since>_<until>`.
-- A stream covers [covers_since, covers_until) (covers_until NULL: open-ended, the live stream)
-- and never reads outside it, so streams of one account never fetch the same event twice.
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS covers_since TIMESTAMPTZ;
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS covers_until TIMESTAMPTZ;
-- Set when a bounded stream (a backfill) has committed its whole range.
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS completed_at TIMESTAMPTZ;
-- When the stream's last sweep finished with everything committed (`cfaudit status`).
ALTER TABLE cfaudit_checkpoints ADD COLUMN IF NOT EXISTS last_sweep_at TIMESTAMPTZ;

-- Rows written before streams existed: their coverage starts at their oldest event.
UPDATE cfaudit_checkpoints c
   SET covers_since = (SELECT min(a.timestamp) FROM audit_logs a WHERE a.account_id = c.account_id)
 WHERE c.covers_since IS NULL AND c.checkpoint IS NOT NULL;
