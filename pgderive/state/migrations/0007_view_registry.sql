-- pgderive.views: the view registry (pgderive/state/registry.py). Per slot, every view pgderive
-- maintains or maintained, with its layout in its sink, so a view removed from the YAML can
-- still be found and dropped (`pgderive drop VIEW`) once the config no longer describes it.
--   sink        the name of the view's sink in the YAML (sinks.NAME)
--   target      the view's layout in that sink, sinks.base.ViewTarget as a JSON object:
--               {"view", "format", "index", "key_shape"} (absent fields: null)
--   fingerprint views.derive.view_fingerprint of the view when it was last recorded
--   status      'active': the daemon maintains it; 'retired': removed from the YAML, its data
--               kept in the sink until `pgderive drop VIEW`
CREATE TABLE IF NOT EXISTS pgderive.views (
    slot        text        NOT NULL,
    view        text        NOT NULL,
    sink        text        NOT NULL,
    target      jsonb       NOT NULL,
    fingerprint text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('active', 'retired')),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, view)
);
