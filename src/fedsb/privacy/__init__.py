"""Differential privacy for federated LoRA-SB and the LoRA baselines.

- `engine`: sample-level DP-SGD with opacus, attached to the shared model for one client-round.
- `client`: `DpSgdSteps`, the DP-SGD step runner of the one client path (`federated.client.train_client`).
- `accounting`: RDP ledgers, noise calibration for a target epsilon over the whole run.
- `init`: the gradient-SVD init under DP (public data, or a Gaussian mechanism, or refused).
- `user_level`: DP-FedAvg as a strategy wrapper.
- `state`: a run's ledgers, metrics and checkpoint state.

See docs/privacy.md.
"""

from fedsb.privacy.accounting import Ledger, PrivacyError, calibrate_noise, default_delta, epsilon_of

__all__ = ["Ledger", "PrivacyError", "calibrate_noise", "default_delta", "epsilon_of"]
