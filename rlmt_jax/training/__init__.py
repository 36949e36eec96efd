"""Updating the policy: the one jitted update step, the optimizer, the SFT/DPO batches, and the stage that
turns scored groups into an update (old and reference log-probs, advantages, critic, policy)."""
