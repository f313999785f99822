"""Settings from the environment (:mod:`.settings`) and generated secrets kept on disk
(:mod:`.secret_files`). Imports nothing else of Strata."""
