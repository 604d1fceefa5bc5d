-- The logins panel ranks every actor and address pair with logins in its range. It read them
-- from audit_actors_daily (through a partial index on logins > 0): at a busy account's rate
-- about 80,000 wide pair-days over 30 days, 125-160 ms. audit_logins_daily keeps the pairs
-- with logins only, with their login counts and last login hour (`last_hour`: every event it
-- counts is a login); audit_logins_between reads it as audit_actors_between reads the pairs.
-- Plain PostgreSQL: a table kept by triggers of its own (fired after migrations 12's and 14's:
-- names sort after them), inserted logins added, the days a delete or a move touched computed
-- again from audit_actors_daily under its lock per day. TimescaleDB: a continuous aggregate on
-- audit_actors_daily, real-time, with its refresh policy; cfaudit refreshes it after its parent.
-- On plain PostgreSQL also two indexes on audit_actors_daily, by actor and by address (see
-- below). Guarded: applying this file twice changes nothing.

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    IF to_regclass('audit_logins_daily') IS NULL THEN
      CREATE MATERIALIZED VIEW audit_logins_daily WITH (timescaledb.continuous) AS
        SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket,
               account_id, api_version, actor_email, actor_type, ip_address,
               sum(logins)::bigint AS logins,
               sum(failed_logins)::bigint AS failed_logins,
               max(last_login_hour) AS last_hour
        FROM audit_actors_daily
        WHERE logins > 0
        GROUP BY 1, 2, 3, 4, 5, 6
        WITH NO DATA;
      PERFORM add_continuous_aggregate_policy('audit_logins_daily',
        start_offset => INTERVAL '4 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
      ALTER MATERIALIZED VIEW audit_logins_daily SET (timescaledb.materialized_only = false);
    END IF;
  ELSE
    LOCK TABLE audit_logs IN SHARE ROW EXCLUSIVE MODE;

    -- The rows of the given days (NULL: all) computed again from audit_actors_daily.
    CREATE OR REPLACE FUNCTION cfaudit_recount_login_days(days TIMESTAMPTZ[])
    RETURNS void LANGUAGE plpgsql AS $fn$
    BEGIN
      DELETE FROM audit_logins_daily WHERE days IS NULL OR bucket = ANY (days);
      INSERT INTO audit_logins_daily
        SELECT bucket, account_id, api_version, actor_email, actor_type, ip_address, logins,
               failed_logins, last_login_hour
        FROM audit_actors_daily
        WHERE logins > 0 AND (days IS NULL OR bucket = ANY (days))
        ORDER BY 1, 2, 3, 4, 5, 6;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION cfaudit_roll_up_logins() RETURNS trigger LANGUAGE plpgsql AS $fn$
    DECLARE
      touched TIMESTAMPTZ[];
      day TIMESTAMPTZ;
    BEGIN
      IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE audit_logins_daily;
      ELSIF TG_OP = 'INSERT' THEN
        -- Inserted logins only add. Upserts in key order, as migration 12's.
        INSERT INTO audit_logins_daily AS d
          SELECT date_trunc('day', timestamp, 'UTC'), account_id, api_version, actor_email,
                 actor_type, ip_address, count(*),
                 count(*) FILTER (WHERE action_result IN ('false', 'failure')),
                 max(date_trunc('hour', timestamp, 'UTC'))
          FROM new_rows WHERE action_type = 'login'
          GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
          ON CONFLICT (bucket, account_id, api_version, actor_email, actor_type, ip_address)
          DO UPDATE SET logins = d.logins + EXCLUDED.logins,
                        failed_logins = d.failed_logins + EXCLUDED.failed_logins,
                        last_hour = greatest(d.last_hour, EXCLUDED.last_hour);
      ELSE
        -- The days a delete took logins from, or a move (which keeps its rows' times) moved a
        -- login in or out of, are computed again, under audit_actors_daily's lock per day
        -- (already held: that table's trigger took it for these days).
        IF TG_OP = 'DELETE' THEN
          SELECT array_agg(DISTINCT date_trunc('day', timestamp, 'UTC')) INTO touched
          FROM old_rows WHERE action_type = 'login';
        ELSE
          SELECT array_agg(DISTINCT date_trunc('day', o.timestamp, 'UTC')) INTO touched
          FROM old_rows o JOIN new_rows n ON n.timestamp = o.timestamp AND n.event_id = o.event_id
          WHERE (o.action_type = 'login' OR n.action_type = 'login')
            AND (o.account_id, o.api_version, o.actor_email, o.actor_type, o.ip_address,
                 o.action_type, o.action_result) IS DISTINCT FROM
                (n.account_id, n.api_version, n.actor_email, n.actor_type, n.ip_address,
                 n.action_type, n.action_result);
        END IF;
        IF touched IS NOT NULL THEN
          FOR day IN SELECT d FROM unnest(touched) AS d ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock(hashtext('audit_actors_daily'),
                                          (extract(epoch FROM day) / 86400)::int);
          END LOOP;
          PERFORM cfaudit_recount_login_days(touched);
        END IF;
      END IF;
      RETURN NULL;
    END
    $fn$;

    IF to_regclass('audit_logins_daily') IS NULL THEN
      CREATE TABLE audit_logins_daily (
        bucket        TIMESTAMPTZ NOT NULL,
        account_id    TEXT,
        api_version   TEXT        NOT NULL,
        actor_email   TEXT,
        actor_type    TEXT,
        ip_address    INET,
        logins        BIGINT      NOT NULL,
        failed_logins BIGINT      NOT NULL,
        last_hour     TIMESTAMPTZ NOT NULL,
        UNIQUE NULLS NOT DISTINCT (bucket, account_id, api_version, actor_email, actor_type,
                                   ip_address)
      );
      COMMENT ON TABLE audit_logins_daily IS
        'Logins per day (UTC) by account, API version, actor and IP address (pairs with logins only), with failed logins and the last hour with a login; kept current by triggers on audit_logs.';
      PERFORM cfaudit_recount_login_days(NULL);
    END IF;

    -- The top-20 panels' second read: the pairs of the 20 actors or addresses they show
    -- (audit_actor_pairs_between, audit_address_pairs_between), which the pairs' key (the day
    -- first) served only by reading every pair of the range: 150 ms of a 250 ms panel over 30
    -- days. TimescaleDB's aggregate has an index per grouped column of its own.
    CREATE INDEX IF NOT EXISTS audit_actors_daily_actor_idx ON audit_actors_daily (actor_email, bucket);
    CREATE INDEX IF NOT EXISTS audit_actors_daily_address_idx ON audit_actors_daily (ip_address, bucket);

    DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_inserted ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_logins_inserted AFTER INSERT ON audit_logs
      REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_logins();
    DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_updated ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_logins_updated AFTER UPDATE ON audit_logs
      REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_logins();
    DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_deleted ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_logins_deleted AFTER DELETE ON audit_logs
      REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_logins();
    DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_truncated ON audit_logs;
    CREATE TRIGGER audit_logs_roll_up_logins_truncated AFTER TRUNCATE ON audit_logs
      FOR EACH STATEMENT EXECUTE FUNCTION cfaudit_roll_up_logins();
  END IF;
END
$$;

-- The logins of [since, until] (accounts and versions as audit_actors_between's): whole days
-- from audit_logins_daily (the day holding `until` too where cfaudit_last_day_is_whole says
-- so), the other hours' pairs with logins from audit_actors_hourly. Group them by actor and
-- address.
SELECT cfaudit_create_reading_function('audit_logins_between',
  'bucket TIMESTAMPTZ, account_id TEXT, api_version TEXT, actor_email TEXT, actor_type TEXT, ip_address INET, logins BIGINT, failed_logins BIGINT, last_login_hour TIMESTAMPTZ',
  $q$
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.logins, r.failed_logins, r.last_hour
  FROM audit_logins_daily r
  WHERE r.bucket >= cfaudit_first_whole_day({since})
    AND r.bucket < cfaudit_whole_days_end({until})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.logins, r.failed_logins, r.last_hour
  FROM audit_logins_daily r
  WHERE r.bucket = cfaudit_utc_day({until})
    AND (SELECT cfaudit_last_day_is_whole('audit_logins_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.logins, r.failed_logins, r.bucket
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until} AND r.logins > 0
    AND r.bucket < cfaudit_first_whole_day({since})
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
  UNION ALL
  SELECT r.bucket, r.account_id, r.api_version, r.actor_email, r.actor_type, r.ip_address,
         r.logins, r.failed_logins, r.bucket
  FROM audit_actors_hourly r
  WHERE r.bucket >= {since} AND r.bucket <= {until} AND r.logins > 0
    AND r.bucket >= greatest(cfaudit_first_whole_day({since}), cfaudit_whole_days_end({until}))
    AND NOT (SELECT cfaudit_last_day_is_whole('audit_logins_daily', {since}, {until}))
    AND r.account_id LIKE ANY ({accounts}) AND ({versions} IS NULL OR r.api_version = ANY ({versions}))
$q$);
COMMENT ON FUNCTION audit_logins_between(TIMESTAMPTZ, TIMESTAMPTZ, TEXT[], TEXT[]) IS
  'Per actor and IP address, the logins of the hours in [since, until] (accounts matching the LIKE patterns, API versions given, NULL: all), whole days from audit_logins_daily: group them by actor and address.';

-- Migration 14's index for the logins panel on the pairs: it reads audit_logins_daily now.
DROP INDEX IF EXISTS audit_actors_daily_logins_idx;
