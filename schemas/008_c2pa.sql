-- The digital source type a generated image's C2PA manifest declares (issue #26): IPTC's code for what kind of
-- process made it, e.g. http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia.
-- Documented in schemas/README.md.

ALTER TABLE generations ADD COLUMN digital_source_type VARCHAR;
