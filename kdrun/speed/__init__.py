"""Speed: work the runner can do once instead of every step.

`views.py`: the finite set of views the in-memory augmentation draws from (crop offset x flip) and their ids;
`cache_policy.py`: whether `teacher.cache_outputs` can be exact for a run (decided, or refused, in `prepare`);
`teacher_cache.py`: the teacher's logits for every (image, view), built once, stored, and looked up by the
batch's indices and view ids instead of running the teacher; `feature_cache.py`: its tapped features beside
them (`teacher.cache_features=true`), for the feature methods whose step runs the teacher on the batch alone.
"""
