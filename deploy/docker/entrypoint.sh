#!/bin/sh
# The image's entrypoint: `gpserve "$@"`, with GP_MODEL_FILE (a file in the /models
# mount, as compose.yaml passes it) turned into GP_MODEL when GP_MODEL is not set.
# With neither, gpserve serves its default model.
if [ -z "${GP_MODEL:-}" ] && [ -n "${GP_MODEL_FILE:-}" ]; then
    export GP_MODEL="/models/${GP_MODEL_FILE}"
fi
exec gpserve "$@"
