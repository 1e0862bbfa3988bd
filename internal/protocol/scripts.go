package protocol

import (
	"crypto/sha1"
	_ "embed"
	"encoding/hex"

	"github.com/redis/rueidis"
)

// The scripts, one file per operation under lua/, each documenting its
// KEYS, ARGV and reply at its top. lib.lua holds helpers shared by the
// scripts and is prepended to those that use them, so every script runs as
// one self-contained EVAL. No script decodes a stored JSON array, and no
// caller input is ever spliced into a script's text: everything arrives
// through KEYS and ARGV.
var (
	//go:embed lua/lib.lua
	lib string
	//go:embed lua/merge.lua
	mergeLua string
	//go:embed lua/mergemany.lua
	mergeManyLua string
	//go:embed lua/claim.lua
	claimLua string
	//go:embed lua/settle.lua
	settleLua string
	//go:embed lua/reap.lua
	reapLua string
	//go:embed lua/requeue.lua
	requeueLua string
	//go:embed lua/register.lua
	registerLua string
)

// Scripts run through rueidis' script helper: EVALSHA, and EVAL after a
// NOSCRIPT reply (a restarted or flushed server). None of them is marked
// retryable: a write that may have been applied is never sent twice.
var (
	mergeScript    = newScript(lib + mergeLua)
	mergeMany      = newScript(lib + mergeManyLua)
	claimScript    = newScript(claimLua)
	settleScript   = newScript(lib + settleLua)
	reapScript     = newScript(lib + reapLua)
	requeueScript  = newScript(lib + requeueLua)
	registerScript = newScript(registerLua)
)

// script is a Lua script and its SHA-1, for pipelined EVALSHAs.
type script struct {
	*rueidis.Lua
	sha string
}

func newScript(src string) script {
	h := sha1.Sum([]byte(src))
	return script{Lua: rueidis.NewLuaScript(src), sha: hex.EncodeToString(h[:])}
}
