-- Teacher rankings for distillation (`audit distill collect`) and the queries they belong to.
-- Documented in schemas/README.md.

CREATE TABLE distill_queries (
    id             BIGINT PRIMARY KEY,
    split          VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,
    path           VARCHAR NOT NULL,
    prompt         VARCHAR,
    seed           BIGINT,
    model_hash     VARCHAR NOT NULL,
    backbone_id    VARCHAR NOT NULL,
    settings_hash  VARCHAR NOT NULL,
    n_candidates   INTEGER,
    seconds        DOUBLE,
    collected_at   TIMESTAMP
);

CREATE TABLE distill_rankings (
    query_id       BIGINT NOT NULL,
    training_id    BIGINT NOT NULL,
    influence      DOUBLE NOT NULL,
    raw_influence  DOUBLE NOT NULL,
    teacher_rank   INTEGER NOT NULL,
    backbone_rank  INTEGER NOT NULL,
    PRIMARY KEY (query_id, training_id)
);
