"""Names both apps agree on: record keys and message types of the fedsb Flower protocol."""

SETUP_ACTION = "setup"  # query.setup: config text + (once) frozen B, A
SETUP_MESSAGE_TYPE = f"query.{SETUP_ACTION}"

SETUP_RECORD = "fedsb.setup"  # ConfigRecord: config-toml, config-sha256, frozen-sha256
FROZEN_RECORD = "fedsb.frozen"  # ArrayRecord: safetensors of B, A
CONFIG_RECORD = "fedsb.round"  # ConfigRecord: round, config-sha256, frozen-sha256
DOWNLOAD_RECORD = "fedsb.download"  # ArrayRecord: safetensors of the global R (and heads)
UPDATE_RECORD = "fedsb.update"  # ArrayRecord: safetensors of the client's R
METRICS_RECORD = "fedsb.metrics"  # MetricRecord: loss, steps, tokens, seconds, num-examples
NODE_RECORD = "fedsb.node"  # ConfigRecord: partition-id, has-frozen

MISSING_SETUP = "missing-setup"  # error reason prefix: the server re-sends setup to that node
