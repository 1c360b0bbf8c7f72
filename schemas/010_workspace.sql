-- A workspace's identity (issue #28): a random id made when the store is created (or first migrated), recorded in
-- every LanceDB table the workspace writes, so that a second workspace pointed at the same location is refused
-- instead of deleting the first one's vectors (index.reconcile). Documented in schemas/README.md.

CREATE TABLE workspace (
    id          VARCHAR PRIMARY KEY,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

INSERT INTO workspace (id) SELECT CAST(uuid() AS VARCHAR);
