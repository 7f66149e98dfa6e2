-- Run by workers.database.migrate.run_sql_file before every migration file (not a revision itself).
-- Its job: once 0005 has set up kc_owner in this database, every migration runs as kc_owner
-- (SET LOCAL ROLE at the end), so its objects belong to the owner and get the owner's default
-- privileges (kc_operator reads every new table and view). Decided per file because one run
-- can take a fresh database from nothing past 0005.
-- The loop first hands kc_owner any object the migrating user still owns. On a fresh database
-- it finds nothing at any revision (0005 hands over what 0001-0004 made; checked at 0021 by
-- making the loop raise and migrating from nothing to head): it only mends a database that one
-- run took from nothing past 0006 before this file existed (commit d601ae9, 2026-11-22), where
-- sweep_pending_allocations belongs to the migrating user and a later CREATE OR REPLACE as
-- kc_owner would fail. It can go with the migrations before it, when a baseline replaces them.
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
