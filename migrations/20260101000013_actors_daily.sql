-- The dashboards' panels on actors and IP addresses (distinct actors and addresses, top actors
-- and addresses, actors with failures, logins by actor and address) read a range of days.
-- Their hourly aggregate holds about one row per three events at a busy account's rate, so a
-- 30-day panel grouped a million rows. audit_actors_daily holds the same groups per UTC day,
-- with the last hour of each (all events, failures, logins): a few thousand rows a day.
-- audit_actors_between(since, until[, accounts, versions]) gives the rows of the hours in
-- [since, until] (what
-- Grafana's $__timeFilter(bucket) selects from the hourly aggregate): every whole day from the
-- daily aggregate, the hours of the partial days at either end from the hourly one. Grouped,
-- its rows give exactly what the same grouping of the hourly aggregate gives.
-- Plain PostgreSQL: a table kept by the triggers of migration 12 (inserted rows are added to
-- their day; a delete or a move recomputes the days it touched from the hourly table, which is
-- exact by then). TimescaleDB: a continuous aggregate over audit_logs, real-time like the
-- hourly ones, with the same refresh policy and cfaudit's own refresh of older days.
-- Guarded: applying this file twice changes nothing.

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    IF to_regclass('audit_actors_daily') IS NULL THEN
      CREATE MATERIALIZED VIEW audit_actors_daily WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 day', timestamp) AS bucket,
               account_id, api_version, actor_email, actor_type, ip_address,
               count(*) AS events,
               count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed_events,
               count(*) FILTER (WHERE action_type = 'login') AS logins,
               count(*) FILTER (WHERE action_type = 'login'
                                  AND action_result IN ('false', 'failure')) AS failed_logins,
               max(time_bucket(INTERVAL '1 hour', timestamp)) AS last_hour,
               max(time_bucket(INTERVAL '1 hour', timestamp))
                 FILTER (WHERE action_result IN ('false', 'failure')) AS last_failure_hour,
               max(time_bucket(INTERVAL '1 hour', timestamp))
                 FILTER (WHERE action_type = 'login') AS last_login_hour
        FROM audit_logs
        GROUP BY 1, 2, 3, 4, 5, 6
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_actors_daily',
        start_offset => INTERVAL '4 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
      ALTER MATERIALIZED VIEW audit_actors_daily SET (timescaledb.materialized_only = false);
    END IF;
  ELSE
    LOCK TABLE audit_logs IN SHARE ROW EXCLUSIVE MODE;
    IF to_regclass('audit_actors_daily') IS NULL THEN
      CREATE TABLE audit_actors_daily (
        bucket            TIMESTAMPTZ NOT NULL,
        account_id        TEXT,
        api_version       TEXT        NOT NULL,
        actor_email       TEXT,
        actor_type        TEXT,
        ip_address        INET,
        events            BIGINT      NOT NULL,
        failed_events     BIGINT      NOT NULL,
        logins            BIGINT      NOT NULL,
        failed_logins     BIGINT      NOT NULL,
        last_hour         TIMESTAMPTZ NOT NULL,
        last_failure_hour TIMESTAMPTZ,
        last_login_hour   TIMESTAMPTZ,
        UNIQUE NULLS NOT DISTINCT (bucket, account_id, api_version, actor_email, actor_type,
                                   ip_address)
      );
      INSERT INTO audit_actors_daily
        SELECT date_trunc('day', bucket, 'UTC'), account_id, api_version, actor_email,
               actor_type, ip_address, sum(events), sum(failed_events), sum(logins),
               sum(failed_logins), max(bucket), max(bucket) FILTER (WHERE failed_events > 0),
               max(bucket) FILTER (WHERE logins > 0)
        FROM audit_actors_hourly
        GROUP BY 1, 2, 3, 4, 5, 6;
    END IF;
    COMMENT ON TABLE audit_actors_daily IS
      'Events per day (UTC) by account, API version, actor and IP address, with failures, logins and the last hour of each; kept current by triggers on audit_logs.';

    -- Migration 12's function, with the daily table added (see there for the rest).
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
      day timestamptz;
    BEGIN
      IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE audit_events_hourly, audit_actors_hourly, audit_actors_daily;
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
        'HAVING sum(sign) <> 0 '
        '    OR sum(sign) FILTER (WHERE action_result IN (''false'', ''failure'')) <> 0 '
        '    OR sum(sign) FILTER (WHERE action_type = ''login'') <> 0 '
        'ORDER BY 1, 2, 3, 4, 5, 6 '
        'ON CONFLICT (bucket, account_id, api_version, actor_email, actor_type, ip_address) '
        'DO UPDATE SET events = h.events + EXCLUDED.events, '
        '              failed_events = h.failed_events + EXCLUDED.failed_events, '
        '              logins = h.logins + EXCLUDED.logins, '
        '              failed_logins = h.failed_logins + EXCLUDED.failed_logins', changed);
      IF TG_OP = 'INSERT' THEN
        -- Inserted rows only add: their counts, and their hour where it is later. A day being
        -- recomputed (below) is not added to meanwhile: a lock per day, shared by adders.
        FOR day IN EXECUTE 'SELECT DISTINCT date_trunc(''day'', timestamp, ''UTC'') FROM new_rows ORDER BY 1'
        LOOP
          PERFORM pg_advisory_xact_lock_shared(hashtext('audit_actors_daily'),
                                               (extract(epoch FROM day) / 86400)::int);
        END LOOP;
        EXECUTE
          'INSERT INTO audit_actors_daily AS d '
          'SELECT date_trunc(''day'', timestamp, ''UTC''), account_id, api_version, actor_email, '
          '       actor_type, ip_address, count(*), '
          '       count(*) FILTER (WHERE action_result IN (''false'', ''failure'')), '
          '       count(*) FILTER (WHERE action_type = ''login''), '
          '       count(*) FILTER (WHERE action_type = ''login'' '
          '                          AND action_result IN (''false'', ''failure'')), '
          '       max(date_trunc(''hour'', timestamp, ''UTC'')), '
          '       max(date_trunc(''hour'', timestamp, ''UTC'')) '
          '         FILTER (WHERE action_result IN (''false'', ''failure'')), '
          '       max(date_trunc(''hour'', timestamp, ''UTC'')) FILTER (WHERE action_type = ''login'') '
          'FROM new_rows GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6 '
          'ON CONFLICT (bucket, account_id, api_version, actor_email, actor_type, ip_address) '
          'DO UPDATE SET events = d.events + EXCLUDED.events, '
          '              failed_events = d.failed_events + EXCLUDED.failed_events, '
          '              logins = d.logins + EXCLUDED.logins, '
          '              failed_logins = d.failed_logins + EXCLUDED.failed_logins, '
          '              last_hour = greatest(d.last_hour, EXCLUDED.last_hour), '
          '              last_failure_hour = greatest(d.last_failure_hour, EXCLUDED.last_failure_hour), '
          '              last_login_hour = greatest(d.last_login_hour, EXCLUDED.last_login_hour)';
      ELSE
        -- A group whose rows all left is gone, as it is from a GROUP BY: looked for only in the
        -- hours the statement took rows from.
        EXECUTE 'DELETE FROM audit_events_hourly WHERE events = 0 AND bucket IN '
                '(SELECT date_trunc(''hour'', timestamp, ''UTC'') FROM old_rows)';
        EXECUTE 'DELETE FROM audit_actors_hourly WHERE events = 0 AND bucket IN '
                '(SELECT date_trunc(''hour'', timestamp, ''UTC'') FROM old_rows)';
        -- A last hour cannot be taken back by subtraction: the days the statement took rows
        -- from (a move keeps its rows' times) are recomputed from the hourly table, exact by
        -- now. Deletes and moves are rare (retention by hand, a re-attributed row). Each day's
        -- lock, held alone, waits for the statements adding to it to commit and keeps new ones
        -- out until this one commits: the recount reads every committed hour, and a statement
        -- still to add its rows adds them to the recount (it has not yet, or it would hold
        -- the lock).
        FOR day IN EXECUTE 'SELECT DISTINCT date_trunc(''day'', timestamp, ''UTC'') FROM old_rows ORDER BY 1'
        LOOP
          PERFORM pg_advisory_xact_lock(hashtext('audit_actors_daily'),
                                        (extract(epoch FROM day) / 86400)::int);
        END LOOP;
        EXECUTE 'DELETE FROM audit_actors_daily WHERE bucket IN '
                '(SELECT date_trunc(''day'', timestamp, ''UTC'') FROM old_rows)';
        EXECUTE
          'INSERT INTO audit_actors_daily '
          'SELECT t.day, h.account_id, h.api_version, h.actor_email, h.actor_type, h.ip_address, '
          '       sum(h.events), sum(h.failed_events), sum(h.logins), sum(h.failed_logins), '
          '       max(h.bucket), max(h.bucket) FILTER (WHERE h.failed_events > 0), '
          '       max(h.bucket) FILTER (WHERE h.logins > 0) '
          'FROM (SELECT DISTINCT date_trunc(''day'', timestamp, ''UTC'') AS day FROM old_rows) t '
          'JOIN audit_actors_hourly h ON h.bucket >= t.day AND h.bucket < t.day + INTERVAL ''1 day'' '
          'GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6';
      END IF;
      RETURN NULL;
    END
    $fn$;
  END IF;
END
$$;

-- The hours of [since, until] as rows of the hourly aggregate's groups, whole days read from
-- the daily one, of the accounts matching `accounts` (LIKE patterns) and the API versions in
-- `versions` (NULL: all). A day is whole when all its 24 hours lie in the range. last_*_hour:
-- the latest hour with events, failures, logins (for an hourly row, its own hour where it has
-- them). PL/pgSQL running a query with the bounds as constants: TimescaleDB plans a continuous
-- aggregate's real-time part well only then (an inlined SQL function made it about ten times
-- slower per row).
CREATE OR REPLACE FUNCTION audit_actors_between(since TIMESTAMPTZ, until TIMESTAMPTZ,
                                                accounts TEXT[] DEFAULT ARRAY['%'],
                                                versions TEXT[] DEFAULT NULL)
RETURNS TABLE (bucket TIMESTAMPTZ, account_id TEXT, api_version TEXT, actor_email TEXT,
               actor_type TEXT, ip_address INET, events BIGINT, failed_events BIGINT,
               logins BIGINT, failed_logins BIGINT, last_hour TIMESTAMPTZ,
               last_failure_hour TIMESTAMPTZ, last_login_hour TIMESTAMPTZ)
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  -- The first whole day, and the end of the last one.
  days_from CONSTANT TIMESTAMPTZ :=
    date_trunc('day', since - INTERVAL '1 microsecond', 'UTC') + INTERVAL '1 day';
  days_until CONSTANT TIMESTAMPTZ :=
    date_trunc('day', until - INTERVAL '23 hours', 'UTC') + INTERVAL '1 day';
BEGIN
  RETURN QUERY EXECUTE format($q$
    SELECT d.bucket, d.account_id, d.api_version, d.actor_email, d.actor_type, d.ip_address,
           d.events, d.failed_events, d.logins, d.failed_logins, d.last_hour,
           d.last_failure_hour, d.last_login_hour
    FROM audit_actors_daily d
    WHERE d.bucket >= %1$L AND d.bucket < %2$L
      AND d.account_id LIKE ANY (%5$L::text[])
      AND (%6$L::text[] IS NULL OR d.api_version = ANY (%6$L::text[]))
    UNION ALL
    SELECT h.bucket, h.account_id, h.api_version, h.actor_email, h.actor_type, h.ip_address,
           h.events, h.failed_events, h.logins, h.failed_logins, h.bucket,
           CASE WHEN h.failed_events > 0 THEN h.bucket END,
           CASE WHEN h.logins > 0 THEN h.bucket END
    FROM audit_actors_hourly h
    WHERE h.bucket BETWEEN %3$L AND %4$L AND (h.bucket < %1$L OR h.bucket >= %2$L)
      AND h.account_id LIKE ANY (%5$L::text[])
      AND (%6$L::text[] IS NULL OR h.api_version = ANY (%6$L::text[]))$q$,
    days_from, days_until, since, until, accounts, versions);
END
$fn$;

COMMENT ON FUNCTION audit_actors_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]) IS
  'The hourly actor aggregate''s rows for the hours in [since, until] (of the accounts matching the LIKE patterns, of the API versions given, NULL: all), whole days read from audit_actors_daily: group them as you would audit_actors_hourly.';
