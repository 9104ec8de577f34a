import sys
from pearl_runtime.cli import main
main(["gateway", *sys.argv[1:]])
