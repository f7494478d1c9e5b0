// Command keyd is the keyd signing daemon and its command-line client.
//
//	keyd serve [--config FILE]           run the daemon (embedded default without --config)
//	keyd check-config --config FILE      validate a configuration
//	keyd health [--wait DURATION]        ask the daemon whether it serves
//	keyd jwks [--keyset NAME]...         print the JWK Set
//	keyd keys list [--json] [--keyset NAME]...
//	keyd keys rotate NAME [--now]
//	keyd keys revoke KID [--keyset NAME]
//	keyd proof --keyset NAME --htm METHOD --htu URL [--access-token T] [--nonce V] [--kid KID]
//	keyd assertion --keyset NAME
//	keyd token --issuer URL --client-id ID --dpop-keyset NAME --assertion-keyset NAME [--scope S]...
//	keyd request [-X METHOD] [-d DATA] [-H 'K: V']... <token flags> URL
//
// Client commands find the daemon by --socket, else $KEYD_SOCKET, else the
// socket of the embedded default configuration.
package main

import (
	"io"
	"os"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command line and returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	return (&cli{stdout: stdout, stderr: stderr}).run(args)
}
