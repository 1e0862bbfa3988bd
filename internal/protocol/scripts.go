package protocol

import (
	"context"
	"crypto/sha1"
	_ "embed"
	"encoding/hex"

	"github.com/redis/rueidis"
)

// The scripts, one file per operation under lua/, each documenting its
// KEYS, ARGV and reply at its top. lib.lua holds helpers shared by the
// scripts; each script is loaded with those it uses in front of it (see
// withLib), so every script runs as one self-contained EVAL. No script decodes a stored JSON array, and no
// caller input is ever spliced into a script's text: everything arrives
// through KEYS and ARGV.
var (
	//go:embed lua/lib.lua
	libLua string
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
	//go:embed lua/shards.lua
	shardsLua string
)

// Scripts run through rueidis' script helper: EVALSHA, and EVAL after a
// NOSCRIPT reply (a restarted or flushed server). None of them is marked
// retryable: a write that may have been applied is never sent twice.
var (
	mergeScript    = newScript(withLib(libLua, mergeLua))
	mergeMany      = newScript(withLib(libLua, mergeManyLua))
	claimScript    = newScript(withLib(libLua, claimLua))
	settleScript   = newScript(withLib(libLua, settleLua))
	reapScript     = newScript(withLib(libLua, reapLua))
	requeueScript  = newScript(withLib(libLua, requeueLua))
	registerScript = newScript(withLib(libLua, registerLua))
	shardsScript   = newScript(withLib(libLua, shardsLua))
)

// ScriptName returns the name of the script whose SHA-1 is sha ("merge",
// "claim" and so on, as its file under lua/), or "" for none of batchq's:
// for tests, which tell round trips apart by what they run.
func ScriptName(sha string) string {
	for name, s := range map[string]script{"merge": mergeScript, "mergemany": mergeMany, "claim": claimScript,
		"settle": settleScript, "reap": reapScript, "requeue": requeueScript, "register": registerScript, "shards": shardsScript} {
		if s.sha == sha {
			return name
		}
	}
	return ""
}

// script is a Lua script and its SHA-1, for pipelined EVALSHAs.
type script struct {
	*rueidis.Lua
	sha string
	src string // for an EVAL pipelined after a NOSCRIPT reply (see execAcked)
}

func newScript(src string) script {
	h := sha1.Sum([]byte(src))
	return script{Lua: rueidis.NewLuaScript(src), sha: hex.EncodeToString(h[:]), src: src}
}

// scriptCall is the KEYS and ARGV of one script call.
type scriptCall struct{ keys, args []string }

// evalsha returns the EVALSHA of s with keys and args, for a pipeline.
func evalsha(c rueidis.Client, s script, keys, args []string) rueidis.Completed {
	return c.B().Evalsha().Sha1(s.sha).Numkeys(int64(len(keys))).Key(keys...).Arg(args...).Build()
}

// eval returns the EVAL of s with keys and args, for a pipeline.
func eval(c rueidis.Client, s script, keys, args []string) rueidis.Completed {
	return c.B().Eval().Script(s.src).Numkeys(int64(len(keys))).Key(keys...).Arg(args...).Build()
}

// noScript reports whether r is a NOSCRIPT reply: the server does not have
// the script (it restarted, or its scripts were flushed).
func noScript(r rueidis.RedisResult) bool {
	re, ok := rueidis.IsRedisErr(r.Error())
	return ok && re.IsNoScript()
}

// evalMany runs s once per call, all in one round trip (pipelined
// EVALSHAs, run in order on each node), and returns the replies in order.
// Calls that met NOSCRIPT go once more: the first through the script
// helper, which loads the script, the others pipelined again.
func evalMany(ctx context.Context, c rueidis.Client, s script, calls []scriptCall) []rueidis.RedisResult {
	send := func(idx []int) []rueidis.RedisResult {
		cmds := make(rueidis.Commands, len(idx))
		for j, i := range idx {
			cmds[j] = evalsha(c, s, calls[i].keys, calls[i].args)
		}
		return c.DoMulti(ctx, cmds...)
	}
	all := make([]int, len(calls))
	for i := range all {
		all[i] = i
	}
	res := send(all)
	var again []int
	for i, r := range res {
		if noScript(r) {
			again = append(again, i)
		}
	}
	if len(again) == 0 {
		return res
	}
	res[again[0]] = s.Exec(ctx, c, calls[again[0]].keys, calls[again[0]].args)
	for j, r := range send(again[1:]) {
		res[again[1+j]] = r
	}
	return res
}
