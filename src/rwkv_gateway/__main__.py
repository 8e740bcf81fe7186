"""`python -m rwkv_gateway` is the same as the `rwkv-gateway` command."""

from rwkv_gateway.cli import main

if __name__ == "__main__":
    main()
