"""Pure math on LOCAL vocabulary shards (torch + torch.distributed only, no Megatron).

Every function takes the local shard ``[..., V_local]`` plus ``vocab_group`` (None = the shard is
the whole vocabulary) and returns what every rank of the group agrees on.
"""
