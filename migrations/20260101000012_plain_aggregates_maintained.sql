-- Plain PostgreSQL: the dashboards' aggregates become tables kept current by audit_logs' own
-- writes, instead of views that group the whole table at every refresh (seconds at millions of
-- rows). Names and columns stay those of migration 9, so every query reads them unchanged.
-- Statement-level triggers with transition tables add each statement's rows to their hours:
-- inserted rows count +1, deleted rows -1, and an update that moves a row between groups
-- (cfaudit sets account_id on commit) takes it from the old group to the new one. Every path
-- that writes audit_logs (the pipeline, `cfaudit replay`, an operator's DELETE for retention,
-- TRUNCATE) keeps them exact, in the writing transaction.
-- Upserts go in key order, so concurrent writers of the same hour wait rather than deadlock
-- (two statements that each insert and move rows can still meet in reverse order: PostgreSQL
-- breaks the tie and the pipeline retries the batch, as after any transient error).
-- Filling them from existing rows reads the whole table once; writers wait for it (the trigger
-- creation locks audit_logs against writes until this migration commits).
-- TimescaleDB keeps its continuous aggregates (hypertables refuse transition tables): nothing
-- changes there. Guarded: applying this file twice changes nothing.

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    RETURN;
  END IF;

  LOCK TABLE audit_logs IN SHARE ROW EXCLUSIVE MODE;

  IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('audit_events_hourly')) = 'v' THEN
    DROP VIEW audit_events_hourly;
  END IF;
  IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('audit_actors_hourly')) = 'v' THEN
    DROP VIEW audit_actors_hourly;
  END IF;

  IF to_regclass('audit_events_hourly') IS NULL THEN
    CREATE TABLE audit_events_hourly (
      bucket           TIMESTAMPTZ NOT NULL,
      account_id       TEXT,
      api_version      TEXT        NOT NULL,
      action_type      TEXT,
      action_result    TEXT,
      resource_type    TEXT,
      resource_product TEXT,
      events           BIGINT      NOT NULL,
      UNIQUE NULLS NOT DISTINCT (bucket, account_id, api_version, action_type, action_result,
                                 resource_type, resource_product)
    );
    INSERT INTO audit_events_hourly
      SELECT date_trunc('hour', timestamp, 'UTC'), account_id, api_version, action_type,
             action_result, resource_type, resource_product, count(*)
      FROM audit_logs
      GROUP BY 1, 2, 3, 4, 5, 6, 7;
  END IF;

  IF to_regclass('audit_actors_hourly') IS NULL THEN
    CREATE TABLE audit_actors_hourly (
      bucket        TIMESTAMPTZ NOT NULL,
      account_id    TEXT,
      api_version   TEXT        NOT NULL,
      actor_email   TEXT,
      actor_type    TEXT,
      ip_address    INET,
      events        BIGINT      NOT NULL,
      failed_events BIGINT      NOT NULL,
      logins        BIGINT      NOT NULL,
      failed_logins BIGINT      NOT NULL,
      UNIQUE NULLS NOT DISTINCT (bucket, account_id, api_version, actor_email, actor_type,
                                 ip_address)
    );
    INSERT INTO audit_actors_hourly
      SELECT date_trunc('hour', timestamp, 'UTC'), account_id, api_version, actor_email,
             actor_type, ip_address, count(*),
             count(*) FILTER (WHERE action_result IN ('false', 'failure')),
             count(*) FILTER (WHERE action_type = 'login'),
             count(*) FILTER (WHERE action_type = 'login'
                                AND action_result IN ('false', 'failure'))
      FROM audit_logs
      GROUP BY 1, 2, 3, 4, 5, 6;
  END IF;

  COMMENT ON TABLE audit_events_hourly IS
    'Events per hour (UTC) by account, API version, action type, result, resource type and product; kept current by triggers on audit_logs.';
  COMMENT ON TABLE audit_actors_hourly IS
    'Events per hour (UTC) by account, API version, actor and IP address, with failures and logins; kept current by triggers on audit_logs.';
  COMMENT ON COLUMN audit_actors_hourly.logins IS
    'Events whose action_type is login (v2 records logins; v1 rarely), and of them those that failed in failed_logins.';

  -- The rows a statement changed, signed: +1 for a row that joins its group, -1 for one that
  -- leaves it. An update that changes none of the grouped columns (ingestion_time) counts
  -- nothing; INSERT ... ON CONFLICT fires both triggers at every statement, so that case
  -- returns at once. Dynamic SQL: each trigger has only the transition tables of its event.
  CREATE OR REPLACE FUNCTION cfaudit_count_rows() RETURNS trigger LANGUAGE plpgsql AS $fn$
  DECLARE
    grouped CONSTANT text := 'timestamp, account_id, api_version, action_type, action_result, '
                             'resource_type, resource_product, actor_email, actor_type, ip_address';
    moved CONSTANT text :=
      'SELECT o.timestamp AS t, o.event_id AS id FROM old_rows o '
      'JOIN new_rows n ON n.timestamp = o.timestamp AND n.event_id = o.event_id '
      'WHERE (o.account_id, o.api_version, o.action_type, o.action_result, o.resource_type, '
      '       o.resource_product, o.actor_email, o.actor_type, o.ip_address) IS DISTINCT FROM '
      '      (n.account_id, n.api_version, n.action_type, n.action_result, n.resource_type, '
      '       n.resource_product, n.actor_email, n.actor_type, n.ip_address)';
    changed text;
    any_moved boolean;
  BEGIN
    IF TG_OP = 'TRUNCATE' THEN
      TRUNCATE audit_events_hourly, audit_actors_hourly;
      RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
      changed := format('SELECT %s, 1 AS sign FROM new_rows', grouped);
    ELSIF TG_OP = 'DELETE' THEN
      changed := format('SELECT %s, -1 AS sign FROM old_rows', grouped);
    ELSE
      EXECUTE format('SELECT EXISTS (%s)', moved) INTO any_moved;
      IF NOT any_moved THEN
        RETURN NULL;
      END IF;
      changed := format(
        'WITH moved AS (%2$s) '
        'SELECT %1$s, -1 AS sign FROM old_rows WHERE (timestamp, event_id) IN (SELECT t, id FROM moved) '
        'UNION ALL SELECT %1$s, 1 FROM new_rows WHERE (timestamp, event_id) IN (SELECT t, id FROM moved)',
        grouped, moved);
    END IF;

    EXECUTE format(
      'INSERT INTO audit_events_hourly AS h '
      'SELECT date_trunc(''hour'', timestamp, ''UTC''), account_id, api_version, action_type, '
      '       action_result, resource_type, resource_product, sum(sign) '
      'FROM (%s) c GROUP BY 1, 2, 3, 4, 5, 6, 7 HAVING sum(sign) <> 0 ORDER BY 1, 2, 3, 4, 5, 6, 7 '
      'ON CONFLICT (bucket, account_id, api_version, action_type, action_result, resource_type, '
      '             resource_product) '
      'DO UPDATE SET events = h.events + EXCLUDED.events', changed);
    EXECUTE format(
      'INSERT INTO audit_actors_hourly AS h '
      'SELECT date_trunc(''hour'', timestamp, ''UTC''), account_id, api_version, actor_email, '
      '       actor_type, ip_address, sum(sign), '
      '       coalesce(sum(sign) FILTER (WHERE action_result IN (''false'', ''failure'')), 0), '
      '       coalesce(sum(sign) FILTER (WHERE action_type = ''login''), 0), '
      '       coalesce(sum(sign) FILTER (WHERE action_type = ''login'' '
      '                                    AND action_result IN (''false'', ''failure'')), 0) '
      'FROM (%s) c GROUP BY 1, 2, 3, 4, 5, 6 '
      -- A failed row leaving a group as a succeeded one joins it changes its failures only.
      'HAVING sum(sign) <> 0 '
      '    OR sum(sign) FILTER (WHERE action_result IN (''false'', ''failure'')) <> 0 '
      '    OR sum(sign) FILTER (WHERE action_type = ''login'') <> 0 '
      'ORDER BY 1, 2, 3, 4, 5, 6 '
      'ON CONFLICT (bucket, account_id, api_version, actor_email, actor_type, ip_address) '
      'DO UPDATE SET events = h.events + EXCLUDED.events, '
      '              failed_events = h.failed_events + EXCLUDED.failed_events, '
      '              logins = h.logins + EXCLUDED.logins, '
      '              failed_logins = h.failed_logins + EXCLUDED.failed_logins', changed);
    IF TG_OP <> 'INSERT' THEN
      -- A group whose rows all left is gone, as it is from a GROUP BY: looked for only in the
      -- hours the statement took rows from.
      EXECUTE 'DELETE FROM audit_events_hourly WHERE events = 0 AND bucket IN '
              '(SELECT date_trunc(''hour'', timestamp, ''UTC'') FROM old_rows)';
      EXECUTE 'DELETE FROM audit_actors_hourly WHERE events = 0 AND bucket IN '
              '(SELECT date_trunc(''hour'', timestamp, ''UTC'') FROM old_rows)';
    END IF;
    RETURN NULL;
  END
  $fn$;

  DROP TRIGGER IF EXISTS audit_logs_count_inserted ON audit_logs;
  CREATE TRIGGER audit_logs_count_inserted AFTER INSERT ON audit_logs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_count_rows();
  DROP TRIGGER IF EXISTS audit_logs_count_updated ON audit_logs;
  CREATE TRIGGER audit_logs_count_updated AFTER UPDATE ON audit_logs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_count_rows();
  DROP TRIGGER IF EXISTS audit_logs_count_deleted ON audit_logs;
  CREATE TRIGGER audit_logs_count_deleted AFTER DELETE ON audit_logs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_count_rows();
  DROP TRIGGER IF EXISTS audit_logs_count_truncated ON audit_logs;
  CREATE TRIGGER audit_logs_count_truncated AFTER TRUNCATE ON audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_count_rows();
END
$$;
