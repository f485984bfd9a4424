"""``python -m prefect_modal.local serve ...``."""

from .cli import main

if __name__ == "__main__":
    main()
