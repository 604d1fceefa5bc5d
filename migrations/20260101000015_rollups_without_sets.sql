-- Migration 14's rollups kept, per actor and day, the sorted set of its addresses (and per
-- address the set of its actors), merged at every insert. A batch rewrote the whole set of
-- every actor it touched: an actor working from many addresses (a token used from a cloud
-- range, or the emulator's random IPv6 addresses) made each batch's cost grow with the day's
-- addresses, and cfaudit's ingest fell from 0.86-0.97 to 0.82-0.88 of `\copy`.
-- The rollups now hold counts and last hours only: cheap to add to. The panels count the
-- distinct addresses (or actors) of the 20 rows they show from the actor and address pairs
-- (audit_actors_daily), read for those actors or addresses only by two reading functions
-- taking them as an argument. No index of their own: on plain PostgreSQL the pair table's key
-- (the day first) serves the range and the filter; on TimescaleDB the aggregate's own index
-- per grouped column serves the filter. Each index on the pairs would cost every batch.
-- Guarded: applying this file twice changes nothing.

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    -- A continuous aggregate's columns cannot be dropped: made again without the sets.
    -- Materialized by cfaudit's refresh at start and by their policies; until then their
    -- real-time part computes them from audit_actors_daily.
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_name = 'audit_actor_activity_daily' AND column_name = 'ip_addresses') THEN
      DROP MATERIALIZED VIEW audit_actor_activity_daily;
      CREATE MATERIALIZED VIEW audit_actor_activity_daily WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket,
               account_id, api_version, actor_email, actor_type,
               sum(events)::bigint AS events,
               sum(failed_events)::bigint AS failed_events,
               max(last_hour) AS last_hour,
               max(last_failure_hour) AS last_failure_hour
        FROM audit_actors_daily
        GROUP BY 1, 2, 3, 4, 5
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_actor_activity_daily',
        start_offset => INTERVAL '4 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
      ALTER MATERIALIZED VIEW audit_actor_activity_daily SET (timescaledb.materialized_only = false);
    END IF;
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_name = 'audit_address_activity_daily' AND column_name = 'actor_emails') THEN
      DROP MATERIALIZED VIEW audit_address_activity_daily;
      CREATE MATERIALIZED VIEW audit_address_activity_daily WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket,
               account_id, api_version, ip_address,
               sum(events)::bigint AS events,
               sum(failed_events)::bigint AS failed_events,
               max(last_hour) AS last_hour
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

    -- The rows of the given days (NULL: all) computed again from audit_actors_daily.
    CREATE OR REPLACE FUNCTION cfaudit_recount_actor_and_address_days(days TIMESTAMPTZ[])
    RETURNS void LANGUAGE plpgsql AS $fn$
    BEGIN
      DELETE FROM audit_actor_activity_daily WHERE days IS NULL OR bucket = ANY (days);
      INSERT INTO audit_actor_activity_daily
        SELECT bucket, account_id, api_version, actor_email, actor_type, sum(events),
               sum(failed_events), max(last_hour), max(last_failure_hour)
        FROM audit_actors_daily
        WHERE days IS NULL OR bucket = ANY (days)
        GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5;
      DELETE FROM audit_address_activity_daily WHERE days IS NULL OR bucket = ANY (days);
      INSERT INTO audit_address_activity_daily
        SELECT bucket, account_id, api_version, ip_address, sum(events), sum(failed_events),
               max(last_hour)
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
                   FILTER (WHERE action_result IN ('false', 'failure'))
          FROM new_rows GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
          ON CONFLICT (bucket, account_id, api_version, actor_email, actor_type)
          DO UPDATE SET events = d.events + EXCLUDED.events,
                        failed_events = d.failed_events + EXCLUDED.failed_events,
                        last_hour = greatest(d.last_hour, EXCLUDED.last_hour),
                        last_failure_hour = greatest(d.last_failure_hour, EXCLUDED.last_failure_hour);
        INSERT INTO audit_address_activity_daily AS d
          SELECT date_trunc('day', timestamp, 'UTC'), account_id, api_version, ip_address,
                 count(*), count(*) FILTER (WHERE action_result IN ('false', 'failure')),
                 max(date_trunc('hour', timestamp, 'UTC'))
          FROM new_rows WHERE ip_address IS NOT NULL
          GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
          ON CONFLICT (bucket, account_id, api_version, ip_address)
          DO UPDATE SET events = d.events + EXCLUDED.events,
                        failed_events = d.failed_events + EXCLUDED.failed_events,
                        last_hour = greatest(d.last_hour, EXCLUDED.last_hour);
      ELSE
        -- Last hours cannot be subtracted from: the days a delete took rows from, or a move
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

    DROP INDEX IF EXISTS audit_address_activity_daily_address_idx;
    ALTER TABLE audit_actor_activity_daily DROP COLUMN IF EXISTS ip_addresses,
      DROP COLUMN IF EXISTS failure_ip_addresses;
    ALTER TABLE audit_address_activity_daily DROP COLUMN IF EXISTS actor_emails;
    DROP FUNCTION IF EXISTS cfaudit_sorted_union(ANYARRAY, ANYARRAY);
    COMMENT ON TABLE audit_actor_activity_daily IS
      'Events per day (UTC) by account, API version and actor, with failures and the last hours; kept current by triggers on audit_logs.';
    COMMENT ON TABLE audit_address_activity_daily IS
      'Events per day (UTC) by account, API version and IP address, with failures and the last hour; kept current by triggers on audit_logs.';
  END IF;
END
$$;

-- Migration 14's helper, with an optional fifth argument (its declaration, such as
-- 'actors TEXT[]'; {actors} in the query stands for it; then every argument is required).
DROP FUNCTION IF EXISTS cfaudit_create_reading_function(TEXT, TEXT, TEXT);
CREATE OR REPLACE FUNCTION cfaudit_create_reading_function(name TEXT, columns TEXT, query TEXT,
                                                           argument TEXT DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
  argument_name CONSTANT TEXT := split_part(argument, ' ', 1);
  argument_type CONSTANT TEXT := substr(argument, length(argument_name) + 2);
  -- Without a fifth argument, accounts and versions may be left out (every one).
  signature CONSTANT TEXT := CASE WHEN argument IS NULL THEN format(
    '%I(since TIMESTAMPTZ, until TIMESTAMPTZ, accounts TEXT[] DEFAULT ARRAY[''%%''], '
    'versions TEXT[] DEFAULT NULL) RETURNS TABLE (%s)', name, columns)
    ELSE format('%I(since TIMESTAMPTZ, until TIMESTAMPTZ, accounts TEXT[], versions TEXT[], '
                '%I %s) RETURNS TABLE (%s)', name, argument_name, argument_type, columns) END;
  query_text TEXT := replace(replace(replace(replace(query,
    '{since}', '%1$L::timestamptz'), '{until}', '%2$L::timestamptz'),
    '{accounts}', '%3$L::text[]'), '{versions}', '%4$L::text[]');
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    IF argument IS NOT NULL THEN
      query_text := replace(query_text, format('{%s}', argument_name),
                            format('%%5$L::%s', argument_type));
    END IF;
    EXECUTE format('CREATE OR REPLACE FUNCTION %s LANGUAGE plpgsql STABLE AS %L', signature,
      format('BEGIN RETURN QUERY EXECUTE format(%L, since, until, accounts, versions%s); END',
             query_text,
             CASE WHEN argument IS NULL THEN '' ELSE ', ' || quote_ident(argument_name) END));
  ELSE
    query_text := replace(replace(replace(replace(query,
      '{since}', 'since'), '{until}', 'until'), '{accounts}', 'accounts'), '{versions}', 'versions');
    IF argument IS NOT NULL THEN
      query_text := replace(query_text, format('{%s}', argument_name), quote_ident(argument_name));
    END IF;
    EXECUTE format('CREATE OR REPLACE FUNCTION %s LANGUAGE sql STABLE AS %L', signature,
                   query_text);
  END IF;
END
$fn$;

-- The reading functions of the rollups, without the sets (their result type changes).
DROP FUNCTION IF EXISTS audit_actor_activity_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]);
SELECT cfaudit_create_reading_function('audit_actor_activity_between',
  'account_id TEXT, api_version TEXT, actor_email TEXT, actor_type TEXT, events BIGINT, failed_events BIGINT, last_hour TIMESTAMPTZ, last_failure_hour TIMESTAMPTZ',
  $q$
  SELECT r.account_id, r.api_version, r.actor_email, r.actor_type, r.events, r.failed_events,
         r.last_hour, r.last_failure_hour
  FROM audit_actor_activity_daily r
  WHERE r.bucket >= cfaudit_first_whole_day({since})
    AND r.bucket < cfaudit_whole_days_end({until})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.account_id, r.api_version, r.actor_email, r.actor_type, r.events, r.failed_events,
         r.last_hour, r.last_failure_hour
  FROM audit_actor_activity_daily r
  WHERE r.bucket = cfaudit_utc_day({until})
    AND (SELECT cfaudit_last_day_is_whole('audit_actor_activity_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.account_id, r.api_version, r.actor_email, r.actor_type, r.events, r.failed_events,
         r.bucket, CASE WHEN r.failed_events > 0 THEN r.bucket END
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until}
    AND r.bucket < cfaudit_first_whole_day({since})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.account_id, r.api_version, r.actor_email, r.actor_type, r.events, r.failed_events,
         r.bucket, CASE WHEN r.failed_events > 0 THEN r.bucket END
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until}
    AND r.bucket >= greatest(cfaudit_first_whole_day({since}), cfaudit_whole_days_end({until}))
    AND NOT (SELECT cfaudit_last_day_is_whole('audit_actor_activity_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
$q$);
COMMENT ON FUNCTION audit_actor_activity_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]) IS
  'Per actor, rows of the hours in [since, until] (accounts matching the LIKE patterns, API versions given, NULL: all), whole days from audit_actor_activity_daily: group them by actor. Its distinct addresses: audit_actor_pairs_between.';

DROP FUNCTION IF EXISTS audit_address_activity_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]);
SELECT cfaudit_create_reading_function('audit_address_activity_between',
  'account_id TEXT, api_version TEXT, ip_address INET, events BIGINT, failed_events BIGINT, last_hour TIMESTAMPTZ',
  $q$
  SELECT r.account_id, r.api_version, r.ip_address, r.events, r.failed_events, r.last_hour
  FROM audit_address_activity_daily r
  WHERE r.bucket >= cfaudit_first_whole_day({since})
    AND r.bucket < cfaudit_whole_days_end({until})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.account_id, r.api_version, r.ip_address, r.events, r.failed_events, r.last_hour
  FROM audit_address_activity_daily r
  WHERE r.bucket = cfaudit_utc_day({until})
    AND (SELECT cfaudit_last_day_is_whole('audit_address_activity_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.account_id, r.api_version, r.ip_address, r.events, r.failed_events, r.bucket
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until} AND r.ip_address IS NOT NULL
    AND r.bucket < cfaudit_first_whole_day({since})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.account_id, r.api_version, r.ip_address, r.events, r.failed_events, r.bucket
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until} AND r.ip_address IS NOT NULL
    AND r.bucket >= greatest(cfaudit_first_whole_day({since}), cfaudit_whole_days_end({until}))
    AND NOT (SELECT cfaudit_last_day_is_whole('audit_address_activity_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
$q$);
COMMENT ON FUNCTION audit_address_activity_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]) IS
  'Per IP address, rows of the hours in [since, until] (accounts matching the LIKE patterns, API versions given, NULL: all), whole days from audit_address_activity_daily: group them by address. Its distinct actors: audit_address_pairs_between.';

-- The actor and address pairs of [since, until] (migration 13's audit_actors_between), the
-- rows also matching `filter` (on the alias r): one query text for the three functions below.
CREATE FUNCTION pg_temp.actor_pairs_query(filter TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $fn$
  SELECT replace($q$
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.events, r.failed_events, r.logins, r.failed_logins, r.last_hour,
         r.last_failure_hour, r.last_login_hour
  FROM audit_actors_daily r
  WHERE r.bucket >= cfaudit_first_whole_day({since})
    AND r.bucket < cfaudit_whole_days_end({until})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
    AND {filter}
  UNION ALL
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.events, r.failed_events, r.logins, r.failed_logins, r.last_hour,
         r.last_failure_hour, r.last_login_hour
  FROM audit_actors_daily r
  WHERE r.bucket = cfaudit_utc_day({until})
    AND (SELECT cfaudit_last_day_is_whole('audit_actors_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
    AND {filter}
  UNION ALL
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.events, r.failed_events, r.logins, r.failed_logins, r.bucket,
         CASE WHEN r.failed_events > 0 THEN r.bucket END,
         CASE WHEN r.logins > 0 THEN r.bucket END
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until}
    AND r.bucket < cfaudit_first_whole_day({since})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
    AND {filter}
  UNION ALL
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.events, r.failed_events, r.logins, r.failed_logins, r.bucket,
         CASE WHEN r.failed_events > 0 THEN r.bucket END,
         CASE WHEN r.logins > 0 THEN r.bucket END
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until}
    AND r.bucket >= greatest(cfaudit_first_whole_day({since}), cfaudit_whole_days_end({until}))
    AND NOT (SELECT cfaudit_last_day_is_whole('audit_actors_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
    AND {filter}
$q$, '{filter}', filter)
$fn$;

SELECT cfaudit_create_reading_function('audit_actors_between',
  'bucket TIMESTAMPTZ, account_id TEXT, api_version TEXT, actor_email TEXT, actor_type TEXT, ip_address INET, events BIGINT, failed_events BIGINT, logins BIGINT, failed_logins BIGINT, last_hour TIMESTAMPTZ, last_failure_hour TIMESTAMPTZ, last_login_hour TIMESTAMPTZ',
  pg_temp.actor_pairs_query('true'));

-- The pairs of the given actors (by e-mail; a NULL element: the actors without one).
SELECT cfaudit_create_reading_function('audit_actor_pairs_between',
  'bucket TIMESTAMPTZ, account_id TEXT, api_version TEXT, actor_email TEXT, actor_type TEXT, ip_address INET, events BIGINT, failed_events BIGINT, logins BIGINT, failed_logins BIGINT, last_hour TIMESTAMPTZ, last_failure_hour TIMESTAMPTZ, last_login_hour TIMESTAMPTZ',
  pg_temp.actor_pairs_query('(r.actor_email = ANY ({actors}) OR (r.actor_email IS NULL AND array_position({actors}, NULL) IS NOT NULL))'),
  'actors TEXT[]');
COMMENT ON FUNCTION audit_actor_pairs_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[], TEXT[]) IS
  'audit_actors_between''s rows of the given actors only (by e-mail; a NULL element: the actors without one): a panel''s distinct addresses of the actors it shows.';

-- The pairs of the given addresses.
SELECT cfaudit_create_reading_function('audit_address_pairs_between',
  'bucket TIMESTAMPTZ, account_id TEXT, api_version TEXT, actor_email TEXT, actor_type TEXT, ip_address INET, events BIGINT, failed_events BIGINT, logins BIGINT, failed_logins BIGINT, last_hour TIMESTAMPTZ, last_failure_hour TIMESTAMPTZ, last_login_hour TIMESTAMPTZ',
  pg_temp.actor_pairs_query('r.ip_address = ANY ({addresses})'),
  'addresses INET[]');
COMMENT ON FUNCTION audit_address_pairs_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[], INET[]) IS
  'audit_actors_between''s rows of the given IP addresses only: a panel''s distinct actors of the addresses it shows.';

DROP FUNCTION pg_temp.actor_pairs_query(TEXT);
