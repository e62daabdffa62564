"""Names both apps agree on: every message type, record name and field key of the fedsb Flower
protocol, each named once here (tests/test_flower_protocol.py fails on a quoted key elsewhere
in `fedsb.flower`). Changing a value changes the wire: nodes and servers of other versions
would no longer understand each other. No imports: the pure screening reads it too.
"""

# --- message types (handler kinds on the node) ------------------------------------------------

SETUP_ACTION = "setup"  # query.setup: config text + (once) frozen B, A
SETUP_MESSAGE_TYPE = f"query.{SETUP_ACTION}"
INIT_ACTION = "init"  # query.init: one exchange of the federated init's sketch protocol
INIT_MESSAGE_TYPE = f"query.{INIT_ACTION}"
TRAIN = "train"  # Flower's MessageType.TRAIN: one round of local training
EVALUATE = "evaluate"  # Flower's MessageType.EVALUATE: federated or party evaluation
SECAGG = "secagg"  # not a message type: the screening kind of a SecAgg+ FitRes
PARTY_EVAL = "party-eval"  # round field (flag) and screening kind: a node-data party's own evaluation

# --- records ----------------------------------------------------------------------------------

SETUP_RECORD = "fedsb.setup"  # ConfigRecord: config-toml, config-sha256, frozen-sha256
FROZEN_RECORD = "fedsb.frozen"  # ArrayRecord: safetensors of B, A
INIT_RECORD = "fedsb.init"  # ConfigRecord: config-sha256, kind (sketch, left, right, project)
CONFIG_RECORD = "fedsb.round"  # ConfigRecord: round, config-sha256, frozen-sha256 (+ base-* for FedEx/FLoRA)
DOWNLOAD_RECORD = "fedsb.download"  # ArrayRecord: safetensors of the global R (and heads); init: the broadcast basis
BASE_RECORD = "fedsb.base"  # ArrayRecord: safetensors of the folded base weights (FedEx/FLoRA catch-up)
UPDATE_RECORD = "fedsb.update"  # ArrayRecord: safetensors of the client's R; init: its sketch message
METRICS_RECORD = "fedsb.metrics"  # MetricRecord: loss, steps, tokens, seconds, num-examples
NODE_RECORD = "fedsb.node"  # ConfigRecord: partition-id, has-frozen (+ base-id it trained on)
SECAGG_FITINS_RECORD = "fitins.config"  # Flower's legacy FitIns layout: a SecAgg+ train message

# --- server -> node fields --------------------------------------------------------------------

CONFIG_TOML = "config-toml"
CONFIG_SHA = "config-sha256"
FROZEN_SHA = "frozen-sha256"
ROUND = "round"
INIT_KIND = "kind"  # the federated init's exchange (sketch, left, right, project)
BASE_FROM = "base-from"  # FedEx/FLoRA: the base the round's download applies to
BASE_ROUND = "base-round"
BASE_SHA = "base-sha256"  # the catch-up base's digest
EVAL_BASE = "base"  # party evaluation of the model as built (before any adapter)
TENSOR_NAMES = "names"  # SecAgg+: the tensor order of the flat vector
WEIGHT = "weight"  # SecAgg+: the weight the server fixed for this partition

# --- node -> server fields (and BASE_ID both ways) --------------------------------------------

PARTITION_ID = "partition-id"  # also the node-config key naming a SuperNode's partition
HAS_FROZEN = "has-frozen"
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
STEPS = "steps"
TOKENS = "tokens"
SECONDS = "seconds"
EPSILON = "epsilon"
PRIVACY_HISTORY = "privacy-history"  # JSON text of a DP node's accountant history
BASE_ID = "base-id"  # FedEx/FLoRA: server -> node: the base to end at; node -> server: the base it used
EVAL_N = "eval-n"
EVAL_CORRECT = "eval-correct"
EVAL_LOSS_SUM = "eval-loss-sum"
EVAL_TOKENS = "eval-tokens"
NODE_MESSAGE_METRIC = "node-message-seconds"  # train reply: the ClientApp process's age at its reply
NODE_STARTUP_METRIC = "node-startup-seconds"  # train reply: that age minus the training seconds
SRC_NODE = "src-node"  # not sent: the sender's node id, added by the server to the fields it screens

# --- error reasons ----------------------------------------------------------------------------

MISSING_SETUP = "missing-setup"  # error reason prefix: the server re-sends setup to that node
MISSING_BASE = "missing-base"  # error reason prefix: the node lacks the folded base it must start from

# --- node config and run config (set by whoever starts the SuperNode or the run) ---------------

NODE_CACHE_DIR = "cache-dir"
NODE_DEVICE = "device"
NODE_DATA_PATH = "data-path"
NODE_WORKER = "node-worker"
FAULT_INJECTION = "fault-injection"  # run config: see `fedsb.flower.faults`

# --- the frames between a ClientApp process and its SuperNode's worker (`node_worker`) ----------

WORKER_KIND = "kind"  # request head: the handler kind
WORKER_STATUS = "status"  # reply head: ok, error (an error reply), raised (the handler raised)
WORKER_CODE = "code"
WORKER_REASON = "reason"
