-- The audit store's public contract: users' SQL depends on these names.
-- Every table and column is documented in schemas/README.md.
-- No FOREIGN KEY constraints: DuckDB cannot update rows that are referenced,
-- and the relationships are documented instead.

CREATE TABLE contributors (
    id          VARCHAR PRIMARY KEY,
    name        VARCHAR,
    license     VARCHAR,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE training_images (
    id              BIGINT PRIMARY KEY,
    path            VARCHAR NOT NULL,
    sha256          VARCHAR NOT NULL UNIQUE,
    contributor_id  VARCHAR,
    caption         VARCHAR,
    caption_source  VARCHAR NOT NULL,
    width           INTEGER NOT NULL,
    height          INTEGER NOT NULL,
    indexed_at      TIMESTAMP NOT NULL
);

CREATE TABLE index_errors (
    path        VARCHAR NOT NULL,
    code        VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    recorded_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE encoders (
    id             VARCHAR PRIMARY KEY,
    name           VARCHAR NOT NULL,
    path           VARCHAR NOT NULL,
    dim            INTEGER NOT NULL,
    config         JSON NOT NULL,
    registered_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE vector_tables (
    encoder_id     VARCHAR PRIMARY KEY,
    uri            VARCHAR NOT NULL,
    table_name     VARCHAR NOT NULL,
    rows           BIGINT NOT NULL,
    lance_version  BIGINT NOT NULL,
    ann_index      VARCHAR,
    updated_at     TIMESTAMP NOT NULL
);

CREATE TABLE scans (
    id             BIGINT PRIMARY KEY,
    started_at     TIMESTAMP NOT NULL,
    finished_at    TIMESTAMP,
    root           VARCHAR NOT NULL,
    encoder_id     VARCHAR NOT NULL,
    index_version  BIGINT NOT NULL,
    top_k          INTEGER NOT NULL,
    device         VARCHAR NOT NULL,
    n_seen         BIGINT NOT NULL DEFAULT 0,
    n_attributed   BIGINT NOT NULL DEFAULT 0,
    n_skipped      BIGINT NOT NULL DEFAULT 0,
    n_errors       BIGINT NOT NULL DEFAULT 0,
    status         VARCHAR NOT NULL
);

CREATE TABLE generations (
    id             BIGINT PRIMARY KEY,
    sha256         VARCHAR NOT NULL UNIQUE,
    path           VARCHAR NOT NULL,
    prompt         VARCHAR,
    prompt_source  VARCHAR NOT NULL,
    width          INTEGER NOT NULL,
    height         INTEGER NOT NULL,
    first_scan_id  BIGINT NOT NULL,
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE attributions (
    generation_id  BIGINT NOT NULL,
    method         VARCHAR NOT NULL,
    encoder_id     VARCHAR NOT NULL,
    rank           INTEGER NOT NULL,
    training_id    BIGINT NOT NULL,
    score          DOUBLE NOT NULL,
    share          DOUBLE NOT NULL,
    scan_id        BIGINT NOT NULL,
    PRIMARY KEY (generation_id, method, encoder_id, rank)
);

CREATE TABLE scan_errors (
    scan_id     BIGINT NOT NULL,
    path        VARCHAR NOT NULL,
    code        VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    recorded_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
