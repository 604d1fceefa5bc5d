-- What a commit costs grows with its batch: these two changes keep that cost small.
-- Guarded: applying this file twice changes nothing.

-- The dataset's event index keyed like audit_logs, by (event_time, event_id). Commits add
-- events in time order, so new keys land at one end of the index; keyed by the id alone
-- (random text), every commit's insert touched pages all over it and was the slowest step of
-- a backfill.
DO $$
BEGIN
  IF (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
       WHERE i.indrelid = 'cfaudit_lake_events'::regclass AND i.indisprimary)
     IS DISTINCT FROM ARRAY['event_time', 'event_id'] THEN
    ALTER TABLE cfaudit_lake_events DROP CONSTRAINT IF EXISTS cfaudit_lake_events_pkey;
    ALTER TABLE cfaudit_lake_events
      ADD CONSTRAINT cfaudit_lake_events_pkey PRIMARY KEY (event_time, event_id);
  END IF;
END $$;

-- Rows of audit_logs that a write changed again after an earlier write of the same event (a
-- retried batch, an attempt that lagged behind). The commit of the event's batch sets their
-- ingestion_time to the batch's, the one the dataset holds, and removes them from here; every
-- other row already carries it, so a commit need not check each of its rows.
CREATE TABLE IF NOT EXISTS cfaudit_rewritten_rows (
  event_time TIMESTAMPTZ NOT NULL,
  event_id   TEXT        NOT NULL,
  PRIMARY KEY (event_time, event_id)
);
