-- What each generated image says about how it was made (issue #26), whether it declares the workspace's model,
-- and the hashes of the checkpoint files that identify that model. Documented in schemas/README.md.

ALTER TABLE generations ADD COLUMN negative_prompt VARCHAR;
ALTER TABLE generations ADD COLUMN generator VARCHAR;
ALTER TABLE generations ADD COLUMN metadata_source VARCHAR;
ALTER TABLE generations ADD COLUMN model_name VARCHAR;
ALTER TABLE generations ADD COLUMN model_hash VARCHAR;
ALTER TABLE generations ADD COLUMN seed HUGEINT;
ALTER TABLE generations ADD COLUMN steps INTEGER;
ALTER TABLE generations ADD COLUMN sampler VARCHAR;
ALTER TABLE generations ADD COLUMN cfg_scale DOUBLE;
ALTER TABLE generations ADD COLUMN declared_width INTEGER;
ALTER TABLE generations ADD COLUMN declared_height INTEGER;
ALTER TABLE generations ADD COLUMN metadata_raw VARCHAR;
ALTER TABLE generations ADD COLUMN metadata_warnings VARCHAR[];
ALTER TABLE generations ADD COLUMN model_match VARCHAR;

CREATE TABLE checkpoint_hashes (
    path        VARCHAR PRIMARY KEY,
    size        BIGINT NOT NULL,
    mtime_ns    BIGINT NOT NULL,
    sha256      VARCHAR NOT NULL,
    autov1      VARCHAR NOT NULL,
    autov3      VARCHAR,
    hashed_at   TIMESTAMP NOT NULL
);
