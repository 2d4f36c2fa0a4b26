-- credbroker schema v12: scheduled rotation at the exchange.
--
-- With `rotate_every_days` > 0 the key-rotation job starts a minted
-- rotation (overlap `overlap_secs`) once that many days have passed since
-- the last rotation of the credential started (or since the management key
-- was stored); a rotation that failed is tried again a day later.
ALTER TABLE management_keys
    ADD COLUMN rotate_every_days INT NOT NULL DEFAULT 0 CHECK (rotate_every_days >= 0),
    ADD COLUMN overlap_secs INT NOT NULL DEFAULT 3600 CHECK (overlap_secs >= 0);
