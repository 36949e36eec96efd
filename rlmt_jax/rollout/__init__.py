"""Making rollouts: the sampler (prefill and decode on the rollout layout), next-token choice, reward
scoring with the reward model's own template, and the stage that turns prompts into scored groups."""
