"""Names that cross process boundaries (message records, metric keys, node config)."""

# Records inside a Message's RecordDict (the "arrays"/"config" keys are FedAvg's defaults).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NODE = "fedkd.node"  # ConfigRecord in replies: who answered (partition id, model name)
RECEIVED_EVALUATION = "fedkd.received-evaluation"  # ConfigRecord in train replies: evaluate metrics of the received model

# Keys inside the ConfigRecord sent to clients.
EXPERIMENT = "fedkd.experiment"  # the resolved experiment config as JSON
CLIENT_LOGIC = "fedkd.client"  # name in fedkd.clients.CLIENTS; "weights" when absent
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
EVALUATE_RECEIVED = "fedkd.evaluate-received"  # bool: evaluate the received model before training it (one-exchange rounds)

# Keys inside reply MetricRecords.
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
LOSS = "loss"
ACCURACY = "accuracy"
EPSILON = "epsilon"

# Keys inside the NODE ConfigRecord of replies.
PARTITION_ID = "partition-id"
MODEL_NAME = "model-name"

# Node config (set by the simulation runtime, or by `flower-supernode --node-config`).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

# Records kept in Context.state between rounds.
STATE_DP_HISTORY = "fedkd.dp-history"

# Distillation strategies (FedMD, FD) and personalised evaluation.
STATE_MODEL = "fedkd.own-model"  # ArrayRecord in Context.state: the client's own (personal) model
PHASE = "fedkd.phase"  # ConfigRecord: the step of a multi-exchange round (FedMD: "score", "digest")
ALIGNMENT_SEED = "fedkd.alignment-seed"  # ConfigRecord: FedMD's public alignment subset of this round
LOGITS = "logits"  # array name inside an ArrayRecord of class scores / per-label logits
LABEL_COUNTS = "label-counts"  # reply MetricRecord (list[int]): FD's samples per label
GLOBAL_LOSS = "global_loss"  # reply MetricRecord: a client's own model on the server's test set
GLOBAL_ACCURACY = "global_accuracy"
# FedD2S (strategies/fedd2s.py, clients/fedd2s.py) and personalised evaluation.
FEDD2S_KNOWLEDGE = "fedd2s.knowledge"  # ArrayRecord: features-<depth> (N, d), logits (N, K), labels (N,)
FEDD2S_SOFT_LABELS = "fedd2s.soft-labels"  # ArrayRecord: soft-labels (N, K), the server's logits per sample
FEDD2S_DROPS = "fedd2s.drops"  # ConfigRecord key: how many deep layers are dropped this round
STATE_FEDD2S_MODEL = "fedd2s.model"  # the client's own model, kept in Context.state

# Randomized quantization (RQM): ConfigRecord keys sent to clients, MetricRecord keys in replies.
RQM_EXTEND = "fedkd.rqm.extend"  # the extend (Delta) in force, when the server calibrated it
RQM_LEVELS = "rqm-levels"  # MetricRecord: how many symbols (RQM levels, PBM trials + 1) the client used
STATE_RQM_ROUNDS = "fedkd.rqm-rounds"  # how many rounds this client has released an RQM update
RQM_COORDS = "rqm-coords"  # MetricRecord: coordinates quantized in this update
PBM_THETA = "fedkd.pbm.theta"  # ConfigRecord: the theta in force, when the server calibrated it

# FedLGD (strategies/fedlgd.py holds the client contract; building blocks in fedkd/distill).
FEDLGD_STATS_PHASE = "stats"  # value of keys.PHASE: round 1's first exchange, each client sends its class statistics
FEDLGD_TRAIN_PHASE = "train"  # value of keys.PHASE: a training exchange
FEDLGD_STATS = "fedlgd.class-stats"  # reply ArrayRecord: mean (K, C), std (K, C) float32, present (K,) bool
FEDLGD_GLOBAL = "fedlgd.global-virtual"  # ArrayRecord sent down: images (K*server_ipc, C, H, W) normalised, labels (K*server_ipc,)
FEDLGD_VERSION = "fedlgd.global-version"  # ConfigRecord: version of the global virtual data in force (0 = initialisation)
FEDLGD_REFRESH = "fedlgd.refresh"  # ConfigRecord (bool): the server refreshes its global data this round: train with plain CE
FEDLGD_LOCAL_DM = "fedlgd.local-dm"  # ConfigRecord (bool): run iterative DM with the received global model before training
STATE_FEDLGD_LOCAL = "fedlgd.local-virtual"  # Context.state ArrayRecord: the client's local virtual images, labels
STATE_FEDLGD_GLOBAL = "fedlgd.global-virtual"  # Context.state ArrayRecord: the last global virtual data received
STATE_FEDLGD_VERSION = "fedlgd.global-version"  # Context.state ConfigRecord: its version
FEDLGD_RUN_DIR = "fedlgd.run-dir"  # ConfigRecord (str): the server's run directory (absolute), where clients that share its filesystem write their grids

# Hypernetworks (HyperFL, pFedHN). The arrays travel under ARRAYS: HyperFL, the hypernetwork's state both ways;
# pFedHN, the generated theta_i down and theta_new - theta_i up.
STATE_HYPERFL = "fedkd.hyperfl.private"  # ArrayRecord in Context.state: embedding.weight and head.* (never sent)
STATE_PFEDHN_HEAD = "fedkd.pfedhn.head"  # ArrayRecord in Context.state: pFedHN-PC's personal last layer (+ momentum/*)
LOSS_HEAD = "loss_head"  # HyperFL reply MetricRecord: mean cross-entropy of the head-only stage
HYPER_REJECTED = "hyper_rejected"  # server train metric: replies refused this round (wrong arrays or non-finite)
PFEDHN_GRAD_NORM = "pfedhn_grad_norm"  # server train metric: mean pre-clip norm of the round's VJP gradients
