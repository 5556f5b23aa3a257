"""Method modifiers that any logit method may switch on, and the keys that only matter when it is on. A run
with a modifier off records (and hashes) none of its keys, so runs made before it existed keep their identity."""
MODIFIER_KEYS = {"logit_standardize": ("base_T", "ls_weight"), "dot": ("dot_delta",)}

# Record columns that only refine a switch: `kdrun compare` names a configuration by the switch instead.
DEPENDENT_COLUMNS = tuple(f"method.{key}" for keys in MODIFIER_KEYS.values() for key in keys)


def drop_off_modifiers(method: dict) -> dict:
    """The method's keys less those of every modifier that is off (its switch false), for identities that must
    stay as they were before the modifier existed: the config hash, the record, an assistant's cache key."""
    off = {key for switch, keys in MODIFIER_KEYS.items() if method.get(switch) is False for key in (switch, *keys)}
    return {key: value for key, value in method.items() if key not in off}
