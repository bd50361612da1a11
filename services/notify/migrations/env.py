from services.notify.adapters.orm import metadata
from services.runtime.migrate import run_env

run_env(metadata, "notify")
