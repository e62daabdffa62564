"""Names both apps agree on: record keys and message types of the fedsb Flower protocol."""

SETUP_ACTION = "setup"  # query.setup: config text + (once) frozen B, A
SETUP_MESSAGE_TYPE = f"query.{SETUP_ACTION}"

INIT_ACTION = "init"  # query.init: one exchange of the federated init's sketch protocol
INIT_MESSAGE_TYPE = f"query.{INIT_ACTION}"
INIT_RECORD = "fedsb.init"  # ConfigRecord: config-sha256, kind (sketch, left, right, project)

SETUP_RECORD = "fedsb.setup"  # ConfigRecord: config-toml, config-sha256, frozen-sha256
FROZEN_RECORD = "fedsb.frozen"  # ArrayRecord: safetensors of B, A
CONFIG_RECORD = "fedsb.round"  # ConfigRecord: round, config-sha256, frozen-sha256 (+ base-* for FedEx/FLoRA)
DOWNLOAD_RECORD = "fedsb.download"  # ArrayRecord: safetensors of the global R (and heads); init: the broadcast basis
BASE_RECORD = "fedsb.base"  # ArrayRecord: safetensors of the folded base weights (FedEx/FLoRA catch-up)
UPDATE_RECORD = "fedsb.update"  # ArrayRecord: safetensors of the client's R; init: its sketch message
METRICS_RECORD = "fedsb.metrics"  # MetricRecord: loss, steps, tokens, seconds, num-examples
NODE_MESSAGE_METRIC = "node-message-seconds"  # train reply: the ClientApp process's age at its reply
NODE_STARTUP_METRIC = "node-startup-seconds"  # train reply: that age minus the training seconds
NODE_RECORD = "fedsb.node"  # ConfigRecord: partition-id, has-frozen (+ base-id it trained on)

MISSING_SETUP = "missing-setup"  # error reason prefix: the server re-sends setup to that node
MISSING_BASE = "missing-base"  # error reason prefix: the node lacks the folded base it must start from
