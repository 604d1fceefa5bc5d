-- The dashboards' panels on actors and on IP addresses read, per range, one row per actor and
-- address pair and day from audit_actors_daily: at a busy account's rate about 6,000 a day,
-- 185,000 over 30 days, which took 120-260 ms to group. Each panel asks about one side only:
-- - audit_actor_activity_daily: per day and actor, the counts, the last hours, and the actor's
--   distinct addresses (all, and those with failures) as sorted arrays: a few hundred rows a
--   day. A panel counts an actor's distinct addresses over a range by unnesting the arrays of
--   the actors it shows only.
-- - audit_address_activity_daily: per day and address, the counts, the last hour and the
--   address's distinct actor emails.
-- audit_actor_activity_between and audit_address_activity_between read them as
-- audit_actors_between reads the pairs: whole days from these, the hours of the partial days
-- at either end from audit_actors_hourly, as rows of one address (or actor) each.
-- Plain PostgreSQL: tables kept by triggers of their own, fired after migration 12's (trigger
-- names sort after them): inserted rows are added (arrays merged); a delete or a move
-- recomputes the days it touched from audit_actors_daily, exact by then and locked per day by
-- the trigger before (see migration 13). TimescaleDB: continuous aggregates on
-- audit_actors_daily, real-time, with its refresh policy; cfaudit refreshes them after it.
-- Guarded: applying this file twice changes nothing.

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    IF to_regclass('audit_actor_activity_daily') IS NULL THEN
      CREATE MATERIALIZED VIEW audit_actor_activity_daily WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket,
               account_id, api_version, actor_email, actor_type,
               sum(events)::bigint AS events,
               sum(failed_events)::bigint AS failed_events,
               max(last_hour) AS last_hour,
               max(last_failure_hour) AS last_failure_hour,
               array_agg(DISTINCT ip_address ORDER BY ip_address)
                 FILTER (WHERE ip_address IS NOT NULL) AS ip_addresses,
               array_agg(DISTINCT ip_address ORDER BY ip_address)
                 FILTER (WHERE ip_address IS NOT NULL AND failed_events > 0) AS failure_ip_addresses
        FROM audit_actors_daily
        GROUP BY 1, 2, 3, 4, 5
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_actor_activity_daily',
        start_offset => INTERVAL '4 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
      ALTER MATERIALIZED VIEW audit_actor_activity_daily SET (timescaledb.materialized_only = false);
    END IF;
    IF to_regclass('audit_address_activity_daily') IS NULL THEN
      CREATE MATERIALIZED VIEW audit_address_activity_daily WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket,
               account_id, api_version, ip_address,
               sum(events)::bigint AS events,
               sum(failed_events)::bigint AS failed_events,
               max(last_hour) AS last_hour,
               array_agg(DISTINCT actor_email ORDER BY actor_email)
                 FILTER (WHERE actor_email IS NOT NULL) AS actor_emails
        FROM audit_actors_daily
        WHERE ip_address IS NOT NULL
        GROUP BY 1, 2, 3, 4
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_address_activity_daily',
        start_offset => INTERVAL '4 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
      ALTER MATERIALIZED VIEW audit_address_activity_daily SET (timescaledb.materialized_only = false);
    END IF;
  ELSE
    LOCK TABLE audit_logs IN SHARE ROW EXCLUSIVE MODE;

    -- `a` and `b` merged: sorted, distinct. The trigger calls it only when `b` holds a value
    -- `a` lacks (a containment test in the statement itself costs far less than a call).
    CREATE OR REPLACE FUNCTION cfaudit_sorted_union(a ANYARRAY, b ANYARRAY) RETURNS ANYARRAY
    LANGUAGE sql IMMUTABLE AS $fn$
      SELECT array_agg(DISTINCT x ORDER BY x) FROM unnest(a || b) AS x
    $fn$;

    -- The rows of the given days (NULL: all) computed again from audit_actors_daily.
    CREATE OR REPLACE FUNCTION cfaudit_recount_actor_and_address_days(days TIMESTAMPTZ[])
    RETURNS void LANGUAGE plpgsql AS $fn$
    BEGIN
      DELETE FROM audit_actor_activity_daily WHERE days IS NULL OR bucket = ANY (days);
      INSERT INTO audit_actor_activity_daily
        SELECT bucket, account_id, api_version, actor_email, actor_type, sum(events),
               sum(failed_events), max(last_hour), max(last_failure_hour),
               array_agg(DISTINCT ip_address ORDER BY ip_address)
                 FILTER (WHERE ip_address IS NOT NULL),
               array_agg(DISTINCT ip_address ORDER BY ip_address)
                 FILTER (WHERE ip_address IS NOT NULL AND failed_events > 0)
        FROM audit_actors_daily
        WHERE days IS NULL OR bucket = ANY (days)
        GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5;
      DELETE FROM audit_address_activity_daily WHERE days IS NULL OR bucket = ANY (days);
      INSERT INTO audit_address_activity_daily
        SELECT bucket, account_id, api_version, ip_address, sum(events), sum(failed_events),
               max(last_hour),
               array_agg(DISTINCT actor_email ORDER BY actor_email)
                 FILTER (WHERE actor_email IS NOT NULL)
        FROM audit_actors_daily
        WHERE ip_address IS NOT NULL AND (days IS NULL OR bucket = ANY (days))
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION cfaudit_roll_up_rows() RETURNS trigger LANGUAGE plpgsql AS $fn$
    DECLARE
      touched TIMESTAMPTZ[];
      day TIMESTAMPTZ;
    BEGIN
      IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE audit_actor_activity_daily, audit_address_activity_daily;
      ELSIF TG_OP = 'INSERT' THEN
        -- Inserted rows only add. Upserts in key order, as migration 12's.
        INSERT INTO audit_actor_activity_daily AS d
          SELECT date_trunc('day', timestamp, 'UTC'), account_id, api_version, actor_email,
                 actor_type, count(*),
                 count(*) FILTER (WHERE action_result IN ('false', 'failure')),
                 max(date_trunc('hour', timestamp, 'UTC')),
                 max(date_trunc('hour', timestamp, 'UTC'))
                   FILTER (WHERE action_result IN ('false', 'failure')),
                 array_agg(DISTINCT ip_address ORDER BY ip_address)
                   FILTER (WHERE ip_address IS NOT NULL),
                 array_agg(DISTINCT ip_address ORDER BY ip_address)
                   FILTER (WHERE ip_address IS NOT NULL AND action_result IN ('false', 'failure'))
          FROM new_rows GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
          ON CONFLICT (bucket, account_id, api_version, actor_email, actor_type)
          DO UPDATE SET events = d.events + EXCLUDED.events,
                        failed_events = d.failed_events + EXCLUDED.failed_events,
                        last_hour = greatest(d.last_hour, EXCLUDED.last_hour),
                        last_failure_hour = greatest(d.last_failure_hour, EXCLUDED.last_failure_hour),
                        ip_addresses =
                          CASE WHEN EXCLUDED.ip_addresses IS NULL
                                 OR d.ip_addresses @> EXCLUDED.ip_addresses THEN d.ip_addresses
                               ELSE cfaudit_sorted_union(d.ip_addresses, EXCLUDED.ip_addresses) END,
                        failure_ip_addresses =
                          CASE WHEN EXCLUDED.failure_ip_addresses IS NULL
                                 OR d.failure_ip_addresses @> EXCLUDED.failure_ip_addresses
                               THEN d.failure_ip_addresses
                               ELSE cfaudit_sorted_union(d.failure_ip_addresses,
                                                         EXCLUDED.failure_ip_addresses) END;
        INSERT INTO audit_address_activity_daily AS d
          SELECT date_trunc('day', timestamp, 'UTC'), account_id, api_version, ip_address,
                 count(*), count(*) FILTER (WHERE action_result IN ('false', 'failure')),
                 max(date_trunc('hour', timestamp, 'UTC')),
                 array_agg(DISTINCT actor_email ORDER BY actor_email)
                   FILTER (WHERE actor_email IS NOT NULL)
          FROM new_rows WHERE ip_address IS NOT NULL
          GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
          ON CONFLICT (bucket, account_id, api_version, ip_address)
          DO UPDATE SET events = d.events + EXCLUDED.events,
                        failed_events = d.failed_events + EXCLUDED.failed_events,
                        last_hour = greatest(d.last_hour, EXCLUDED.last_hour),
                        actor_emails =
                          CASE WHEN EXCLUDED.actor_emails IS NULL
                                 OR d.actor_emails @> EXCLUDED.actor_emails THEN d.actor_emails
                               ELSE cfaudit_sorted_union(d.actor_emails, EXCLUDED.actor_emails) END;
      ELSE
        -- Arrays cannot be subtracted from: the days a delete took rows from, or a move
        -- (which keeps its rows' times) moved them in, are computed again, under the same
        -- lock per day as audit_actors_daily's recount (already held when that trigger took
        -- it: locks of a transaction stack).
        IF TG_OP = 'DELETE' THEN
          SELECT array_agg(DISTINCT date_trunc('day', timestamp, 'UTC')) INTO touched
          FROM old_rows;
        ELSE
          SELECT array_agg(DISTINCT date_trunc('day', o.timestamp, 'UTC')) INTO touched
          FROM old_rows o JOIN new_rows n ON n.timestamp = o.timestamp AND n.event_id = o.event_id
          WHERE (o.account_id, o.api_version, o.actor_email, o.actor_type, o.ip_address,
                 o.action_result) IS DISTINCT FROM
                (n.account_id, n.api_version, n.actor_email, n.actor_type, n.ip_address,
                 n.action_result);
        END IF;
        IF touched IS NOT NULL THEN
          FOR day IN SELECT d FROM unnest(touched) AS d ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock(hashtext('audit_actors_daily'),
                                          (extract(epoch FROM day) / 86400)::int);
          END LOOP;
          PERFORM cfaudit_recount_actor_and_address_days(touched);
        END IF;
      END IF;
      RETURN NULL;
    END
    $fn$;
    IF to_regclass('audit_actor_activity_daily') IS NULL THEN
      CREATE TABLE audit_actor_activity_daily (
        bucket               TIMESTAMPTZ NOT NULL,
        account_id           TEXT,
        api_version          TEXT        NOT NULL,
        actor_email          TEXT,
        actor_type           TEXT,
        events               BIGINT      NOT NULL,
        failed_events        BIGINT      NOT NULL,
        last_hour            TIMESTAMPTZ NOT NULL,
        last_failure_hour    TIMESTAMPTZ,
        ip_addresses         INET[],
        failure_ip_addresses INET[],
        UNIQUE NULLS NOT DISTINCT (bucket, account_id, api_version, actor_email, actor_type)
      );
      COMMENT ON TABLE audit_actor_activity_daily IS
        'Events per day (UTC) by account, API version and actor, with failures, the last hours and the distinct IP addresses (all, and of failures; sorted, NULL for none); kept current by triggers on audit_logs.';
      CREATE TABLE audit_address_activity_daily (
        bucket        TIMESTAMPTZ NOT NULL,
        account_id    TEXT,
        api_version   TEXT        NOT NULL,
        ip_address    INET        NOT NULL,
        events        BIGINT      NOT NULL,
        failed_events BIGINT      NOT NULL,
        last_hour     TIMESTAMPTZ NOT NULL,
        actor_emails  TEXT[],
        UNIQUE NULLS NOT DISTINCT (bucket, account_id, api_version, ip_address)
      );
      COMMENT ON TABLE audit_address_activity_daily IS
        'Events per day (UTC) by account, API version and IP address, with failures, the last hour and the distinct actor emails (sorted, NULL for none); kept current by triggers on audit_logs.';
      PERFORM cfaudit_recount_actor_and_address_days(NULL);
    END IF;

    DROP TRIGGER IF EXISTS audit_logs_roll_up_inserted ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_inserted AFTER INSERT ON audit_logs
      REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_rows();
    DROP TRIGGER IF EXISTS audit_logs_roll_up_updated ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_updated AFTER UPDATE ON audit_logs
      REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_rows();
    DROP TRIGGER IF EXISTS audit_logs_roll_up_deleted ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_deleted AFTER DELETE ON audit_logs
      REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_rows();
    DROP TRIGGER IF EXISTS audit_logs_roll_up_truncated ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_truncated AFTER TRUNCATE ON audit_logs
      FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_rows();
  END IF;
END
$$;

-- UTC days for the reading functions below: the first midnight at or after `since`, the end of
-- the last day whose 24 hours all lie at or before `until` (a day is whole when every hour
-- of it is in the range), and the midnight at or before `until`. Arithmetic on seconds since
-- the epoch, which PostgreSQL knows to be immutable (adding an interval to a timestamptz
-- depends on the session's time zone): a reading function's bounds are constants it plans
-- with, and are the same in every session.
CREATE OR REPLACE FUNCTION cfaudit_first_whole_day(since TIMESTAMPTZ) RETURNS TIMESTAMPTZ
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT to_timestamp((ceil(extract(epoch FROM since - TIMESTAMPTZ 'epoch') / 86400) * 86400)::float8)
$fn$;
CREATE OR REPLACE FUNCTION cfaudit_whole_days_end(until TIMESTAMPTZ) RETURNS TIMESTAMPTZ
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT to_timestamp(((floor((extract(epoch FROM until - TIMESTAMPTZ 'epoch') - 82800) / 86400) + 1)
                       * 86400)::float8)
$fn$;
CREATE OR REPLACE FUNCTION cfaudit_utc_day(t TIMESTAMPTZ) RETURNS TIMESTAMPTZ
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT to_timestamp((floor(extract(epoch FROM t - TIMESTAMPTZ 'epoch') / 86400) * 86400)::float8)
$fn$;

-- Whether the day holding `until` is read whole from `daily` (a rollup with bucket and
-- last_hour) by a reading function over [since, until]. Whole days are those whose 24 hours
-- all lie in the range (as audit_actors_between's); on plain PostgreSQL, where the rollups are
-- current in every transaction, so is the day holding `until` when it began in the range and
-- none of its rows has an hour after `until`: a range that ends now reads today from the
-- rollup, not hour by hour. Not on TimescaleDB: there a day not yet materialized is computed
-- from audit_logs at query time, and its hours are cheaper.
CREATE OR REPLACE FUNCTION cfaudit_last_day_is_whole(daily REGCLASS, since TIMESTAMPTZ,
                                                     until TIMESTAMPTZ)
RETURNS BOOLEAN LANGUAGE plpgsql STABLE AS $fn$
DECLARE
  last_day CONSTANT TIMESTAMPTZ := cfaudit_utc_day(until);
  whole BOOLEAN := false;
BEGIN
  IF last_day = cfaudit_whole_days_end(until) AND since <= last_day
     AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    EXECUTE format('SELECT coalesce(max(last_hour) <= %L, true) FROM %s WHERE bucket = %L',
                   until, daily, last_day) INTO whole;
  END IF;
  RETURN whole;
END
$fn$;

-- Creates a reading function `name(since, until, accounts, versions)` returning `columns`
-- from `query` ({since}, {until}, {accounts} and {versions} stand for the arguments). Plain
-- PostgreSQL: a SQL function the planner inlines into the panel's query, so the bounds are
-- constants it plans with and a panel's own filter reaches the scans. TimescaleDB: PL/pgSQL
-- running the query with the arguments as constants, because TimescaleDB bounds a real-time
-- aggregate's materialized part by a function it only evaluates once where the aggregate is
-- named in the query itself; inlined, it was evaluated for every row (ten times slower).
CREATE OR REPLACE FUNCTION cfaudit_create_reading_function(name TEXT, columns TEXT, query TEXT)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
  signature CONSTANT TEXT := format(
    '%I(since TIMESTAMPTZ, until TIMESTAMPTZ, accounts TEXT[] DEFAULT ARRAY[''%%''], '
    'versions TEXT[] DEFAULT NULL) RETURNS TABLE (%s)', name, columns);
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    EXECUTE format('CREATE OR REPLACE FUNCTION %s LANGUAGE plpgsql STABLE AS %L', signature,
      format('BEGIN RETURN QUERY EXECUTE format(%L, since, until, accounts, versions); END',
             replace(replace(replace(replace(query,
               '{since}', '%1$L::timestamptz'), '{until}', '%2$L::timestamptz'),
               '{accounts}', '%3$L::text[]'), '{versions}', '%4$L::text[]')));
  ELSE
    EXECUTE format('CREATE OR REPLACE FUNCTION %s LANGUAGE sql STABLE AS %L', signature,
      replace(replace(replace(replace(query,
        '{since}', 'since'), '{until}', 'until'), '{accounts}', 'accounts'),
        '{versions}', 'versions'));
  END IF;
END
$fn$;

-- Per actor, the rows of [since, until] (accounts and versions as audit_actors_between's):
-- the whole days from audit_actor_activity_daily (the day holding `until` too where
-- cfaudit_last_day_is_whole says so), the other hours' rows of audit_actors_hourly as they
-- are (one address each; grouping them here would sort them all). Group them by actor; an
-- actor's distinct addresses are the distinct elements of its rows' arrays.
-- The bounds are constants, and the day holding `until` is decided once (a subquery), so
-- each part is one index range.
SELECT cfaudit_create_reading_function('audit_actor_activity_between',
  'account_id TEXT, api_version TEXT, actor_email TEXT, actor_type TEXT, events BIGINT, failed_events BIGINT, last_hour TIMESTAMPTZ, last_failure_hour TIMESTAMPTZ, ip_addresses INET[], failure_ip_addresses INET[]',
  $q$
  SELECT d.account_id, d.api_version, d.actor_email, d.actor_type, d.events, d.failed_events,
         d.last_hour, d.last_failure_hour, d.ip_addresses, d.failure_ip_addresses
  FROM audit_actor_activity_daily d
  WHERE d.bucket >= cfaudit_first_whole_day({since})
    AND d.bucket < cfaudit_whole_days_end({until})
    AND d.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR d.api_version = ANY ({versions}))
  UNION ALL
  SELECT d.account_id, d.api_version, d.actor_email, d.actor_type, d.events, d.failed_events,
         d.last_hour, d.last_failure_hour, d.ip_addresses, d.failure_ip_addresses
  FROM audit_actor_activity_daily d
  WHERE d.bucket = cfaudit_utc_day({until})
    AND (SELECT cfaudit_last_day_is_whole('audit_actor_activity_daily', {since}, {until}))
    AND d.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR d.api_version = ANY ({versions}))
  UNION ALL
  SELECT h.account_id, h.api_version, h.actor_email, h.actor_type, h.events, h.failed_events,
         h.bucket, CASE WHEN h.failed_events > 0 THEN h.bucket END,
         CASE WHEN h.ip_address IS NOT NULL THEN ARRAY[h.ip_address] END,
         CASE WHEN h.ip_address IS NOT NULL AND h.failed_events > 0 THEN ARRAY[h.ip_address] END
  FROM audit_actors_hourly h
  WHERE h.bucket >= {since} AND h.bucket <= {until}
    AND h.bucket < cfaudit_first_whole_day({since})
    AND h.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR h.api_version = ANY ({versions}))
  UNION ALL
  SELECT h.account_id, h.api_version, h.actor_email, h.actor_type, h.events, h.failed_events,
         h.bucket, CASE WHEN h.failed_events > 0 THEN h.bucket END,
         CASE WHEN h.ip_address IS NOT NULL THEN ARRAY[h.ip_address] END,
         CASE WHEN h.ip_address IS NOT NULL AND h.failed_events > 0 THEN ARRAY[h.ip_address] END
  FROM audit_actors_hourly h
  WHERE h.bucket >= {since} AND h.bucket <= {until}
    AND h.bucket >= greatest(cfaudit_first_whole_day({since}), cfaudit_whole_days_end({until}))
    AND NOT (SELECT cfaudit_last_day_is_whole('audit_actor_activity_daily', {since}, {until}))
    AND h.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR h.api_version = ANY ({versions}))
$q$);

COMMENT ON FUNCTION audit_actor_activity_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]) IS
  'Per actor, rows of the hours in [since, until] (accounts matching the LIKE patterns, API versions given, NULL: all), whole days from audit_actor_activity_daily: group them by actor; distinct addresses are the distinct elements of the arrays.';

-- Per address, as audit_actor_activity_between per actor.
SELECT cfaudit_create_reading_function('audit_address_activity_between',
  'account_id TEXT, api_version TEXT, ip_address INET, events BIGINT, failed_events BIGINT, last_hour TIMESTAMPTZ, actor_emails TEXT[]',
  $q$
  SELECT d.account_id, d.api_version, d.ip_address, d.events, d.failed_events, d.last_hour,
         d.actor_emails
  FROM audit_address_activity_daily d
  WHERE d.bucket >= cfaudit_first_whole_day({since})
    AND d.bucket < cfaudit_whole_days_end({until})
    AND d.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR d.api_version = ANY ({versions}))
  UNION ALL
  SELECT d.account_id, d.api_version, d.ip_address, d.events, d.failed_events, d.last_hour,
         d.actor_emails
  FROM audit_address_activity_daily d
  WHERE d.bucket = cfaudit_utc_day({until})
    AND (SELECT cfaudit_last_day_is_whole('audit_address_activity_daily', {since}, {until}))
    AND d.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR d.api_version = ANY ({versions}))
  UNION ALL
  SELECT h.account_id, h.api_version, h.ip_address, h.events, h.failed_events, h.bucket,
         CASE WHEN h.actor_email IS NOT NULL THEN ARRAY[h.actor_email] END
  FROM audit_actors_hourly h
  WHERE h.bucket >= {since} AND h.bucket <= {until} AND h.ip_address IS NOT NULL
    AND h.bucket < cfaudit_first_whole_day({since})
    AND h.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR h.api_version = ANY ({versions}))
  UNION ALL
  SELECT h.account_id, h.api_version, h.ip_address, h.events, h.failed_events, h.bucket,
         CASE WHEN h.actor_email IS NOT NULL THEN ARRAY[h.actor_email] END
  FROM audit_actors_hourly h
  WHERE h.bucket >= {since} AND h.bucket <= {until} AND h.ip_address IS NOT NULL
    AND h.bucket >= greatest(cfaudit_first_whole_day({since}), cfaudit_whole_days_end({until}))
    AND NOT (SELECT cfaudit_last_day_is_whole('audit_address_activity_daily', {since}, {until}))
    AND h.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR h.api_version = ANY ({versions}))
$q$);

COMMENT ON FUNCTION audit_address_activity_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]) IS
  'Per IP address, rows of the hours in [since, until] (accounts matching the LIKE patterns, API versions given, NULL: all), whole days from audit_address_activity_daily: group them by address; distinct actors are the distinct elements of actor_emails.';

-- A panel counts the distinct actors of the addresses it shows: their days, by address.
CREATE INDEX IF NOT EXISTS audit_address_activity_daily_address_idx
  ON audit_address_activity_daily (ip_address, bucket);

-- Migration 13's reading of the actor and address pairs, made the same way as the two above:
-- on plain PostgreSQL inlined (the logins panel's filter reaches the scans) and the day
-- holding `until` read whole where it can be.
SELECT cfaudit_create_reading_function('audit_actors_between',
  'bucket TIMESTAMPTZ, account_id TEXT, api_version TEXT, actor_email TEXT, actor_type TEXT, ip_address INET, events BIGINT, failed_events BIGINT, logins BIGINT, failed_logins BIGINT, last_hour TIMESTAMPTZ, last_failure_hour TIMESTAMPTZ, last_login_hour TIMESTAMPTZ',
  $q$
  SELECT d.bucket, d.account_id, d.api_version, d.actor_email, d.actor_type, d.ip_address,
         d.events, d.failed_events, d.logins, d.failed_logins, d.last_hour,
         d.last_failure_hour, d.last_login_hour
  FROM audit_actors_daily d
  WHERE d.bucket >= cfaudit_first_whole_day({since})
    AND d.bucket < cfaudit_whole_days_end({until})
    AND d.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR d.api_version = ANY ({versions}))
  UNION ALL
  SELECT d.bucket, d.account_id, d.api_version, d.actor_email, d.actor_type, d.ip_address,
         d.events, d.failed_events, d.logins, d.failed_logins, d.last_hour,
         d.last_failure_hour, d.last_login_hour
  FROM audit_actors_daily d
  WHERE d.bucket = cfaudit_utc_day({until})
    AND (SELECT cfaudit_last_day_is_whole('audit_actors_daily', {since}, {until}))
    AND d.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR d.api_version = ANY ({versions}))
  UNION ALL
  SELECT h.bucket, h.account_id, h.api_version, h.actor_email, h.actor_type, h.ip_address,
         h.events, h.failed_events, h.logins, h.failed_logins, h.bucket,
         CASE WHEN h.failed_events > 0 THEN h.bucket END,
         CASE WHEN h.logins > 0 THEN h.bucket END
  FROM audit_actors_hourly h
  WHERE h.bucket >= {since} AND h.bucket <= {until}
    AND h.bucket < cfaudit_first_whole_day({since})
    AND h.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR h.api_version = ANY ({versions}))
  UNION ALL
  SELECT h.bucket, h.account_id, h.api_version, h.actor_email, h.actor_type, h.ip_address,
         h.events, h.failed_events, h.logins, h.failed_logins, h.bucket,
         CASE WHEN h.failed_events > 0 THEN h.bucket END,
         CASE WHEN h.logins > 0 THEN h.bucket END
  FROM audit_actors_hourly h
  WHERE h.bucket >= {since} AND h.bucket <= {until}
    AND h.bucket >= greatest(cfaudit_first_whole_day({since}), cfaudit_whole_days_end({until}))
    AND NOT (SELECT cfaudit_last_day_is_whole('audit_actors_daily', {since}, {until}))
    AND h.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR h.api_version = ANY ({versions}))
$q$);

-- The logins panel reads the pairs with logins only: about one in eight.
CREATE INDEX IF NOT EXISTS audit_actors_daily_logins_idx ON audit_actors_daily (bucket)
  WHERE logins > 0;

-- No JIT compilation in this database: the dashboards' queries take milliseconds, and
-- compiling them took 20 to 50 ms each (PostgreSQL compiles any query its planner prices
-- above jit_above_cost, and a reading function's parts for hours it ends up skipping count in
-- that price). cfaudit's own statements are as short. Only the database's owner may set this;
-- another role is told how.
DO $$
BEGIN
  IF pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'MEMBER') THEN
    EXECUTE format('ALTER DATABASE %I SET jit = off', current_database());
  ELSE
    RAISE NOTICE 'cfaudit: JIT compilation stays on in this database (only its owner may turn it off); the dashboards'' actor and address panels answer 20-50 ms slower with it: ALTER DATABASE % SET jit = off', quote_ident(current_database());
  END IF;
END
$$;
