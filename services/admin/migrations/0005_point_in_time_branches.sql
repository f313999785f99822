-- Point-in-time branches (CreateBranch with as_of, origin 'point_in_time'):
-- a Postgres server of their own, restored from the WAL archive of the
-- server Strata manages, in <data>/pitr/branches/<name>, run by the admin
-- service on `port`. They have no database in this cluster, hence no
-- `database`; `as_of` is the time they were restored to. The port can
-- change when the admin service restarts them and finds it taken.
ALTER TABLE admin.branches ALTER COLUMN database DROP NOT NULL;
ALTER TABLE admin.branches DROP CONSTRAINT branches_origin_check;
ALTER TABLE admin.branches
    ADD CONSTRAINT branches_origin_check CHECK (origin IN ('branch', 'restore', 'point_in_time')),
    ADD COLUMN as_of timestamptz,
    ADD COLUMN port integer CHECK (port BETWEEN 1 AND 65535),
    ADD CONSTRAINT branches_kind_check CHECK (
        CASE WHEN origin = 'point_in_time'
            THEN database IS NULL AND as_of IS NOT NULL AND port IS NOT NULL
            ELSE database IS NOT NULL AND as_of IS NULL AND port IS NULL
        END
    );

GRANT UPDATE (port) ON admin.branches TO strata_app;
