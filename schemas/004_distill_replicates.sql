-- The teacher run again on collected queries with independent noise (`audit eval --replicate`): stored, so its
-- cost is paid once and it travels with `audit distill export`. Documented in schemas/README.md.

CREATE TABLE distill_replicates (
    query_id       BIGINT NOT NULL,
    training_id    BIGINT NOT NULL,
    settings_hash  VARCHAR NOT NULL,
    influence      DOUBLE NOT NULL,
    PRIMARY KEY (query_id, training_id, settings_hash)
);
