-- Lists page by (created_at, id) with a cursor naming the last row seen (web/pagination.py). now()
-- is the time the transaction began: a create that then waited for its client's lock (a concurrent
-- create, rename or key rotation) got a created_at older than rows committed while it waited, and
-- a reader already past that point never saw it. clock_timestamp() is the time of the insert
-- itself, after the lock: only the short step from insert to commit remains (docs/api.md).
ALTER TABLE clients ALTER COLUMN created_at SET DEFAULT clock_timestamp();
ALTER TABLE rules ALTER COLUMN created_at SET DEFAULT clock_timestamp();
ALTER TABLE endpoints ALTER COLUMN created_at SET DEFAULT clock_timestamp();
ALTER TABLE silences ALTER COLUMN created_at SET DEFAULT clock_timestamp();
