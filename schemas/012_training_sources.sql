-- Training sets kept as WebDataset tar shards or Parquet manifests (issue #28; auditor/sources.py): a training image
-- read from one keeps where it came from, so reports and SQL can point back to it and re-embedding can read it again,
-- and every shard or Parquet file that has been read to the end is recorded, so that a killed `audit index` resumes at
-- the shard in flight and shards added later are read on their own. Documented in schemas/README.md.

ALTER TABLE training_images ADD COLUMN shard VARCHAR;
ALTER TABLE training_images ADD COLUMN shard_key VARCHAR;
ALTER TABLE training_images ADD COLUMN shard_member VARCHAR;

CREATE TABLE training_shards (
    shard       VARCHAR PRIMARY KEY,
    status      VARCHAR NOT NULL,
    samples     BIGINT NOT NULL,
    errors      BIGINT NOT NULL,
    reason      VARCHAR,
    indexed_at  TIMESTAMP NOT NULL
);
