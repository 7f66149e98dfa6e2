-- Run by workers.database.migrate.run_sql_file before every migration file (not a revision itself).
-- Once 0005 has set up kc_owner in this database, every migration runs as kc_owner, so its
-- objects belong to the owner and get the owner's default privileges (kc_operator reads every
-- new table and view). Objects that an older migration run left with the migrating user
-- (before this file existed, a fresh database got 0006 as that user) are given to kc_owner
-- first, while we are still that user, so the migration may replace them.
DO $$
DECLARE
    v_object record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kc_owner'
                   AND has_schema_privilege(oid, 'public', 'CREATE'))
       OR NOT pg_has_role(current_user, 'kc_owner', 'MEMBER') THEN
        RETURN;
    END IF;
    FOR v_object IN
        SELECT format('ALTER %s public.%I OWNER TO kc_owner',
                      CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                     ELSE 'TABLE' END, c.relname) AS stmt
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p')
          AND c.relowner <> 'kc_owner'::regrole AND pg_has_role(current_user, c.relowner, 'USAGE')
        UNION ALL
        SELECT format('ALTER FUNCTION %s OWNER TO kc_owner', p.oid::regprocedure)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
          AND p.proowner <> 'kc_owner'::regrole AND pg_has_role(current_user, p.proowner, 'USAGE')
    LOOP
        EXECUTE v_object.stmt;
    END LOOP;
    SET LOCAL ROLE kc_owner;
END
$$;
