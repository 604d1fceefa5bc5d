-- In the bookkeeping tables, `account_id` holds a stream key: the account id for the live
-- stream, `<account>.backfill.<since>_<until>` for a backfill. The columns keep their name, so
-- that a process of the previous release (a rolling update, a rollback) still reads and writes
-- them; the schema says what they hold. Applying this file twice changes nothing.
COMMENT ON COLUMN cfaudit_checkpoints.account_id IS
  'Stream key: the account id for the live stream, <account>.backfill.<since>_<until> for a backfill.';
COMMENT ON COLUMN cfaudit_parquet_files.account_id IS
  'Stream key of the stream that committed the file (see cfaudit_checkpoints.account_id).';
