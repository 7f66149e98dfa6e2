-- 0010: no trainer in two places at once, in the form every PostgreSQL reader knows:
--   EXCLUDE USING gist (trainer_id WITH =, tstzrange(starts_at, ends_at) WITH &&)
-- 0001 built it on an md5-derived box (kc_trainer_time_box) because the embedded server of
-- the time (pgserver, PostgreSQL 16.2) had no btree_gist. The embedded server now ships
-- contrib, as Debian's and the managed services' packages do. tstzrange is half-open ([)),
-- so back-to-back sessions do not conflict, as before.

-- btree_gist is a trusted extension: a role with CREATE on the database may install it.
-- Migrations run as kc_owner (before_each.sql), which has no such right; the login role
-- (a superuser or the database owner, who ran 0005) has, so it installs it, in a schema of
-- its own so that its ~100 functions stay out of public. Then the migration's role returns.
-- Both role changes are LOCAL: they end with this migration's transaction.
SELECT set_config('kc.migration_role', current_user, true);
SET LOCAL ROLE NONE;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'btree_gist') THEN
        RETURN;
    END IF;
    IF NOT has_database_privilege(current_database(), 'CREATE') THEN
        RAISE EXCEPTION 'migration 0010 needs the btree_gist extension and % may not create it',
            current_user
            USING HINT = format('as a superuser or the owner of database %s: CREATE SCHEMA IF '
                                'NOT EXISTS extensions; CREATE EXTENSION btree_gist SCHEMA '
                                'extensions; then migrate again', current_database());
    END IF;
    CREATE SCHEMA IF NOT EXISTS extensions;
    CREATE EXTENSION btree_gist SCHEMA extensions;
END
$$;
DO $$
BEGIN
    EXECUTE format('SET LOCAL ROLE %I', current_setting('kc.migration_role'));
END
$$;

-- One statement, so the table is never without the rule (it holds an exclusive lock).
ALTER TABLE tutoring_sessions
    DROP CONSTRAINT tutoring_sessions_no_trainer_overlap,
    ADD CONSTRAINT tutoring_sessions_no_trainer_overlap
        EXCLUDE USING gist (trainer_id WITH =, tstzrange(starts_at, ends_at) WITH &&)
        WHERE (status = 'scheduled');

DROP FUNCTION kc_trainer_time_box(uuid, timestamptz, timestamptz);
