-- 0023 the distance between a trainer's neighbouring home sessions has one home:
-- kc_settings.max_sequential_km.
--
-- Issue 24 put it in kc_settings for the moves and substitutes (the app calls those straight
-- in SQL, with no worker environment in between), while the allocation stage read the
-- workers' MAX_SEQUENTIAL_DISTANCE_KM: one value in two places, which nothing kept equal. The
-- allocation's searches now read kc_settings too (sql/queries/allocation.sql), and the
-- environment variable is refused at start with where the value went (workers/settings.py).

GRANT SELECT ON kc_settings TO kc_worker;

COMMENT ON COLUMN kc_settings.max_sequential_km IS
    'How far apart (km, between the students'' homes) a trainer''s home sessions in the hour before and after a session may be: the neighbours rule of every search (the allocation stage''s, moves and substitutes). The one home of this value.';
