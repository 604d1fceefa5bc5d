-- Plain PostgreSQL: the daily aggregates (audit_actors_daily and the three rollups made from it)
-- are no longer updated by every statement that writes audit_logs. Each statement records the
-- UTC days it changed in cfaudit_unfolded_days; cfaudit_fold_days() computes those days again
-- from the hourly table, which the triggers still keep exact in every statement. cfaudit calls
-- it behind its writers (a second apart at least) and at the end of a run, as it refreshes
-- TimescaleDB's continuous aggregates.
-- Why: a batch's rows hardly share an actor and address pair, so every statement updated
-- about one daily row per row written, twice more for the rollups: 150 statements of 1,000
-- emulator-like rows took 10-15 s with them and 5-6 s with the hourly tables alone.
-- The reading functions stay exact meanwhile: a day not folded yet is read hour by hour, as
-- the hours at either end of a range are. Folding only reads committed hours, and a day
-- stays recorded until a fold that began after its writer committed has folded it.
-- The triggers also count an update that changes a row's time now (the grouped columns of the
-- old rows not among the new, and the other way round), which migration 12's function missed.
-- TimescaleDB keeps its continuous aggregates: nothing changes there. Guarded: applying this
-- file twice changes nothing.

DO $$
DECLARE
  reader REGPROCEDURE;
  definition TEXT;
  parts TEXT[];
  -- The parts of a reading function's text the rewrite below looks for and adds.
  whole_days CONSTANT TEXT := 'r.bucket < cfaudit_whole_days_end(until)';
  hours_after CONSTANT TEXT :=
    'r.bucket >= greatest(cfaudit_first_whole_day(since), cfaudit_whole_days_end(until))';
  in_range CONSTANT TEXT := 'r.bucket >= since AND r.bucket <= until';
  not_last_day CONSTANT TEXT := 'NOT \(SELECT cfaudit_last_day_is_whole\([^)]*\)\)';
  folded_end CONSTANT TEXT := '(SELECT cfaudit_folded_days_end(since, until))';
  folded_all CONSTANT TEXT :=
    '(SELECT cfaudit_folded_days_end(since, until) = cfaudit_whole_days_end(until))';
  folded_some CONSTANT TEXT :=
    '(SELECT cfaudit_folded_days_end(since, until) < cfaudit_whole_days_end(until))';
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    RETURN;
  END IF;

  LOCK TABLE audit_logs IN SHARE ROW EXCLUSIVE MODE;

  CREATE TABLE IF NOT EXISTS cfaudit_unfolded_days (day TIMESTAMPTZ NOT NULL);
  COMMENT ON TABLE cfaudit_unfolded_days IS
    'UTC days whose rows changed since the daily aggregates were last computed for them (one row per writing statement and day); SELECT cfaudit_fold_days() folds them.';

  DROP TRIGGER IF EXISTS audit_logs_roll_up_inserted ON audit_logs;
  DROP TRIGGER IF EXISTS audit_logs_roll_up_updated ON audit_logs;
  DROP TRIGGER IF EXISTS audit_logs_roll_up_deleted ON audit_logs;
  DROP TRIGGER IF EXISTS audit_logs_roll_up_truncated ON audit_logs;
  DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_inserted ON audit_logs;
  DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_updated ON audit_logs;
  DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_deleted ON audit_logs;
  DROP TRIGGER IF EXISTS audit_logs_roll_up_logins_truncated ON audit_logs;
  DROP FUNCTION IF EXISTS cfaudit_roll_up_rows();
  DROP FUNCTION IF EXISTS cfaudit_roll_up_logins();

  -- Migration 12's function (see there), with the days recorded instead of the daily table
  -- updated, and an update's rows compared as multisets: a row that left its group (the old
  -- rows' grouped columns, time included, not among the new) counts -1, one that joined its
  -- group +1. One statement computes them once for the three tables.
  CREATE OR REPLACE FUNCTION cfaudit_count_rows() RETURNS trigger LANGUAGE plpgsql AS $fn$
  DECLARE
    grouped CONSTANT text := 'timestamp, account_id, api_version, action_type, action_result, '
                             'resource_type, resource_product, actor_email, actor_type, ip_address';
    changed text;
  BEGIN
    IF TG_OP = 'TRUNCATE' THEN
      TRUNCATE audit_events_hourly, audit_actors_hourly, audit_actors_daily,
               audit_actor_activity_daily, audit_address_activity_daily, audit_logins_daily,
               cfaudit_unfolded_days;
      RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
      changed := format('SELECT %s, 1 AS sign FROM new_rows', grouped);
    ELSIF TG_OP = 'DELETE' THEN
      changed := format('SELECT %s, -1 AS sign FROM old_rows', grouped);
    ELSE
      -- INSERT ... ON CONFLICT fires this at every statement, mostly with no rows.
      IF NOT EXISTS (SELECT 1 FROM old_rows) THEN
        RETURN NULL;
      END IF;
      changed := format(
        'SELECT *, -1 AS sign FROM (SELECT %1$s FROM old_rows EXCEPT ALL SELECT %1$s FROM new_rows) o '
        'UNION ALL SELECT *, 1 FROM (SELECT %1$s FROM new_rows EXCEPT ALL SELECT %1$s FROM old_rows) n',
        grouped);
    END IF;

    EXECUTE format(
      'WITH changed AS MATERIALIZED (%s), '
      'events AS (INSERT INTO audit_events_hourly AS h '
      '  SELECT date_trunc(''hour'', timestamp, ''UTC''), account_id, api_version, action_type, '
      '         action_result, resource_type, resource_product, sum(sign) '
      '  FROM changed GROUP BY 1, 2, 3, 4, 5, 6, 7 HAVING sum(sign) <> 0 ORDER BY 1, 2, 3, 4, 5, 6, 7 '
      '  ON CONFLICT (bucket, account_id, api_version, action_type, action_result, resource_type, '
      '               resource_product) '
      '  DO UPDATE SET events = h.events + EXCLUDED.events), '
      'actors AS (INSERT INTO audit_actors_hourly AS h '
      '  SELECT date_trunc(''hour'', timestamp, ''UTC''), account_id, api_version, actor_email, '
      '         actor_type, ip_address, sum(sign), '
      '         coalesce(sum(sign) FILTER (WHERE action_result IN (''false'', ''failure'')), 0), '
      '         coalesce(sum(sign) FILTER (WHERE action_type = ''login''), 0), '
      '         coalesce(sum(sign) FILTER (WHERE action_type = ''login'' '
      '                                      AND action_result IN (''false'', ''failure'')), 0) '
      '  FROM changed GROUP BY 1, 2, 3, 4, 5, 6 '
      '  HAVING sum(sign) <> 0 '
      '      OR sum(sign) FILTER (WHERE action_result IN (''false'', ''failure'')) <> 0 '
      '      OR sum(sign) FILTER (WHERE action_type = ''login'') <> 0 '
      '  ORDER BY 1, 2, 3, 4, 5, 6 '
      '  ON CONFLICT (bucket, account_id, api_version, actor_email, actor_type, ip_address) '
      '  DO UPDATE SET events = h.events + EXCLUDED.events, '
      '                failed_events = h.failed_events + EXCLUDED.failed_events, '
      '                logins = h.logins + EXCLUDED.logins, '
      '                failed_logins = h.failed_logins + EXCLUDED.failed_logins) '
      'INSERT INTO cfaudit_unfolded_days '
      '  SELECT DISTINCT date_trunc(''day'', timestamp, ''UTC'') FROM changed', changed);
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

  -- Computes the daily aggregates again for the days recorded, from the hourly table, and
  -- returns how many days that was. One fold at a time (an advisory lock: cfaudit's processes,
  -- an operator). Each statement reads what is committed when it starts (READ COMMITTED), so
  -- the hours read include every write whose recorded day this fold took: a day recorded by
  -- a writer still running stays recorded for the next fold.
  CREATE OR REPLACE FUNCTION cfaudit_fold_days() RETURNS INTEGER LANGUAGE plpgsql AS $fn$
  DECLARE
    days TIMESTAMPTZ[];
  BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('cfaudit_fold_days'));
    WITH taken AS (DELETE FROM cfaudit_unfolded_days RETURNING day)
    SELECT array_agg(DISTINCT day ORDER BY day) INTO days FROM taken;
    IF days IS NULL THEN
      RETURN 0;
    END IF;
    DELETE FROM audit_actors_daily WHERE bucket = ANY (days);
    INSERT INTO audit_actors_daily
      SELECT t.day, h.account_id, h.api_version, h.actor_email, h.actor_type, h.ip_address,
             sum(h.events), sum(h.failed_events), sum(h.logins), sum(h.failed_logins),
             max(h.bucket), max(h.bucket) FILTER (WHERE h.failed_events > 0),
             max(h.bucket) FILTER (WHERE h.logins > 0)
      FROM unnest(days) AS t(day)
      JOIN audit_actors_hourly h ON h.bucket >= t.day AND h.bucket < t.day + INTERVAL '1 day'
      GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6;
    PERFORM cfaudit_recount_actor_and_address_days(days);
    PERFORM cfaudit_recount_login_days(days);
    RETURN cardinality(days);
  END
  $fn$;
  COMMENT ON FUNCTION cfaudit_fold_days() IS
    'Computes the daily aggregates (audit_actors_daily, audit_actor_activity_daily, audit_address_activity_daily, audit_logins_daily) again for the days in cfaudit_unfolded_days, from audit_actors_hourly; returns how many days. cfaudit calls it behind its writers.';

  -- The end of the whole days a reading function over [since, until] reads from a daily
  -- aggregate: the end of the last whole day, or the first day not folded since, whichever
  -- is first. The hours after it are read from the hourly table.
  CREATE OR REPLACE FUNCTION cfaudit_folded_days_end(since TIMESTAMPTZ, until TIMESTAMPTZ)
  RETURNS TIMESTAMPTZ LANGUAGE sql STABLE AS $fn$
    SELECT least(cfaudit_whole_days_end(until),
                 (SELECT min(day) FROM cfaudit_unfolded_days
                  WHERE day >= cfaudit_first_whole_day(since)))
  $fn$;

  -- Migration 14's function (see there), and the day holding `until` not folded since
  -- `since`'s first whole day is not whole either (the hours from the first such day on are
  -- read hour by hour).
  CREATE OR REPLACE FUNCTION cfaudit_last_day_is_whole(daily REGCLASS, since TIMESTAMPTZ,
                                                       until TIMESTAMPTZ)
  RETURNS BOOLEAN LANGUAGE plpgsql STABLE AS $fn$
  DECLARE
    last_day CONSTANT TIMESTAMPTZ := cfaudit_utc_day(until);
    whole BOOLEAN := false;
  BEGIN
    IF last_day = cfaudit_whole_days_end(until) AND since <= last_day
       AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND NOT EXISTS (SELECT 1 FROM cfaudit_unfolded_days
                       WHERE day >= cfaudit_first_whole_day(since) AND day <= last_day) THEN
      EXECUTE format('SELECT coalesce(max(last_hour) <= %L, true) FROM %s WHERE bucket = %L',
                     until, daily, last_day) INTO whole;
    END IF;
    RETURN whole;
  END
  $fn$;

  -- The reading functions read whole days up to cfaudit_folded_days_end, and hour by hour
  -- from there. Their text is that of migrations 15 and 16, four parts joined by UNION ALL
  -- (whole days from the daily aggregate, the day holding `until` from it, the hours before
  -- the first whole day, the hours after the whole days), made six:
  -- * the whole days as before, when none of them waits for a fold;
  -- * otherwise the whole days up to the first one waiting, from the daily aggregate,
  -- * and the hours from there to the end of the whole days, from the hourly one.
  -- Each condition on the fold is a subquery (evaluated once per query) that names no row, so
  -- PostgreSQL plans it as a gate and estimates the usual case with constant bounds; the two
  -- parts for days waiting are bounded by subqueries only, which it estimates as a narrow
  -- range (its estimates add up every part, gated or not, and decide whether a panel hashes
  -- or sorts its rows). A bound per row on the fold in the usual case was estimated blind (a
  -- subquery: 1,175 of 75,798 rows, and the logins panel sorted on disk instead of hashing) or
  -- evaluated for every row where a bitmap scan rechecks its conditions (a stable call: the
  -- top actors' pairs, 53,000 calls, 450 ms). A reading function made later on plain
  -- PostgreSQL needs the same.
  FOR reader IN
    SELECT p.oid::regprocedure FROM pg_proc p
    WHERE p.proname IN ('audit_actors_between', 'audit_actor_pairs_between',
                        'audit_address_pairs_between', 'audit_actor_activity_between',
                        'audit_address_activity_between', 'audit_logins_between')
      AND p.pronamespace = 'public'::regnamespace
      AND pg_get_functiondef(p.oid) NOT LIKE '%cfaudit_folded_days_end%'
  LOOP
    definition := pg_get_functiondef(reader);
    parts := string_to_array(split_part(definition, '$function$', 2), 'UNION ALL');
    IF cardinality(parts) <> 4 OR strpos(parts[1], whole_days) = 0
       OR strpos(parts[4], hours_after) = 0 OR strpos(parts[4], in_range) = 0
       OR parts[4] !~ not_last_day THEN
      RAISE EXCEPTION 'reading function % is not the text migration 18 expects', reader;
    END IF;
    EXECUTE split_part(definition, '$function$', 1) || '$function$' || array_to_string(ARRAY[
      replace(parts[1], whole_days, whole_days || ' AND ' || folded_all),
      replace(parts[1], whole_days, 'r.bucket < ' || folded_end || ' AND ' || folded_some),
      parts[2],
      parts[3],
      parts[4],
      regexp_replace(replace(replace(parts[4], hours_after, 'true'), in_range,
                             'r.bucket >= ' || folded_end
                             || ' AND r.bucket < (SELECT cfaudit_whole_days_end(until))'),
                     not_last_day, folded_some)], 'UNION ALL') || '$function$';
  END LOOP;
  -- Each reader names the fold's bound five times, or it was not rewritten.
  IF EXISTS (SELECT 1 FROM pg_proc
             WHERE pronamespace = 'public'::regnamespace AND proname LIKE 'audit\_%\_between'
               AND prosrc LIKE '%cfaudit_whole_days_end%'
               AND (length(prosrc) - length(replace(prosrc, 'cfaudit_folded_days_end', '')))
                   <> 5 * length('cfaudit_folded_days_end')) THEN
    RAISE EXCEPTION 'a reading function was not rewritten to read unfolded days hour by hour';
  END IF;
END
$$;
