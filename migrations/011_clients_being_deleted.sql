-- A client being deleted (DELETE /api/v1/clients/{id}): the API answers at once, having deleted its
-- rules, silences and endpoints and set `deleting_since`; its notification history, which may be
-- millions of rows, is deleted afterwards in batches by the aggregate workers' retention
-- (agents/retention.py `finish_client_deletions`), and the row last. Until then the row is kept for
-- the history's foreign keys only: the API answers 404 for it and the pipeline records nothing new
-- for it. NULL: the client is live.
ALTER TABLE clients ADD COLUMN deleting_since timestamptz;
-- Its key goes in the same transaction, so the key answers 401 at once. Nullable only for that.
ALTER TABLE clients ALTER COLUMN api_key_hash DROP NOT NULL;
ALTER TABLE clients ADD CONSTRAINT clients_key_until_deleted
    CHECK ((api_key_hash IS NULL) = (deleting_since IS NOT NULL));
-- The retention's round looks them up every few seconds: normally none.
CREATE INDEX clients_being_deleted_idx ON clients (deleting_since) WHERE deleting_since IS NOT NULL;
