#!/usr/bin/env node
// relay-baseline: the media relay written "the common way" — one Node.js process, the `ws`
// package, a Map of calls — doing the same pass-through routing as Relay's telephony path, so
// relay-bench can measure both side by side. See README.md.
//
// Deliberately plain: no pacing of outbound audio, no backpressure, no workers or cluster.
// Each message is parsed once to route it and forwarded as the text that arrived.

'use strict';

const http = require('http');
const { URL } = require('url');
const { WebSocket, WebSocketServer } = require('ws');

// --- configuration --------------------------------------------------------------------------

// `--listen host:port` (or `--listen=host:port`); `--agent-url` as a default agent. Other flags
// that relay-bench passes to a spawned Relay (`--cores`, `--log`, `--data-dir`, `--agent-allow`)
// are accepted and ignored, so `relay-bench telephony --spawn bench/baseline/start` works too.
function parseArgs(argv) {
  const opts = { listen: '127.0.0.1:8090', agentUrl: process.env.AGENT_URL || null };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value;
    if (arg.startsWith('--') && arg.includes('=')) {
      [arg, value] = [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)];
    } else if (arg.startsWith('--') && i + 1 < argv.length && !argv[i + 1].startsWith('--')) {
      value = argv[++i];
    }
    if (arg === '--listen' && value) opts.listen = value;
    else if (arg === '--agent-url' && value) opts.agentUrl = value;
  }
  const colon = opts.listen.lastIndexOf(':');
  if (colon < 0) throw new Error(`--listen wants host:port, got ${opts.listen}`);
  opts.host = opts.listen.slice(0, colon).replace(/^\[|\]$/g, '');
  opts.port = Number(opts.listen.slice(colon + 1));
  return opts;
}

const opts = parseArgs(process.argv.slice(2));

// --- state ----------------------------------------------------------------------------------

// callSid → { caller, agent, pending: [text], frontends: Set<WebSocket>, streamSid }
const calls = new Map();

function getCall(callSid) {
  let call = calls.get(callSid);
  if (!call) {
    call = { caller: null, agent: null, pending: [], frontends: new Set(), streamSid: null };
    calls.set(callSid, call);
  }
  return call;
}

function sendTo(ws, text) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(text);
}

function toFrontends(call, payload, track) {
  if (call.frontends.size === 0) return;
  const text = JSON.stringify({ event: 'audio', payload, track });
  for (const fe of call.frontends) sendTo(fe, text);
}

// --- HTTP -----------------------------------------------------------------------------------

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (req.method === 'GET' && path === '/health') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ status: 'ok' }));
    return;
  }
  res.writeHead(404, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify({ error: 'Not found' }));
});

const wss = new WebSocketServer({ noServer: true });

server.on('upgrade', (req, socket, head) => {
  socket.on('error', () => {}); // a reset during the handshake must not crash the process
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname === '/twilio/stream') {
    wss.handleUpgrade(req, socket, head, (ws) => handleTwilio(ws, url));
  } else if (url.pathname === '/frontend-stream') {
    wss.handleUpgrade(req, socket, head, (ws) => handleFrontend(ws, url));
  } else {
    socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
  }
});

// --- WS /twilio/stream: the caller (Twilio) side ----------------------------------------------

function handleTwilio(ws, url) {
  let callSid = url.searchParams.get('callSid'); // seed 003 style; customParameters wins
  let call = null;

  ws.on('message', (data, isBinary) => {
    if (isBinary) return; // Twilio sends text frames only
    const text = data.toString();
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      console.log(`twilio: bad JSON: ${err.message}`);
      return;
    }
    switch (msg.event) {
      case 'connected':
        break;
      case 'start': {
        const start = msg.start || {};
        const params = start.customParameters || {};
        callSid = params.callSid || start.callSid || callSid;
        if (!callSid) {
          console.log('twilio: start without callSid; closing');
          ws.close(1008, 'callSid required');
          return;
        }
        call = getCall(callSid);
        call.caller = ws;
        call.streamSid = msg.streamSid || start.streamSid;
        console.log(`call ${callSid}: started (${calls.size} calls)`);
        const agentUrl = params.agentUrl || opts.agentUrl;
        if (agentUrl) connectAgent(call, callSid, agentUrl, text);
        break;
      }
      case 'media':
        if (!call) return;
        toAgent(call, text);
        if (msg.media) toFrontends(call, msg.media.payload, 'inbound');
        break;
      case 'dtmf':
      case 'mark': // Twilio reports played marks back to the bot, so a bot expects these too
        if (call) toAgent(call, text);
        break;
      case 'stop':
        if (call) toAgent(call, text);
        endCall(callSid, 'stop');
        break;
      default:
        break;
    }
  });

  ws.on('close', () => {
    if (callSid && calls.get(callSid) && calls.get(callSid).caller === ws) endCall(callSid, 'caller closed');
  });
  ws.on('error', (err) => console.log(`call ${callSid}: caller error: ${err.message}`));
}

// Dials the agent and greets it as Twilio would: `connected`, then the `start` as received.
function connectAgent(call, callSid, agentUrl, startText) {
  let agent;
  try {
    agent = new WebSocket(agentUrl);
  } catch (err) {
    console.log(`call ${callSid}: bad agent URL ${agentUrl}: ${err.message}`);
    return;
  }
  call.agent = agent;
  call.pending = [JSON.stringify({ event: 'connected', protocol: 'Call', version: '1.0.0' }), startText];

  agent.on('open', () => {
    for (const text of call.pending) agent.send(text);
    call.pending = [];
  });

  agent.on('message', (data, isBinary) => {
    if (isBinary) return;
    const text = data.toString();
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      console.log(`call ${callSid}: agent sent bad JSON: ${err.message}`);
      return;
    }
    switch (msg.event) {
      case 'media':
        sendTo(call.caller, text); // no pacing: straight through, the common way
        if (msg.media) toFrontends(call, msg.media.payload, 'outbound');
        break;
      case 'mark':
      case 'clear':
        sendTo(call.caller, text);
        break;
      default:
        break;
    }
  });

  agent.on('error', (err) => console.log(`call ${callSid}: agent error: ${err.message}`));
  agent.on('close', () => {
    if (call.agent === agent) {
      call.agent = null;
      call.pending = [];
    }
  });
}

function toAgent(call, text) {
  const agent = call.agent;
  if (!agent) return;
  if (agent.readyState === WebSocket.CONNECTING) call.pending.push(text);
  else if (agent.readyState === WebSocket.OPEN) agent.send(text);
}

function endCall(callSid, why) {
  const call = calls.get(callSid);
  if (!call) return;
  calls.delete(callSid);
  console.log(`call ${callSid}: ended (${why}; ${calls.size} calls)`);
  if (call.agent) {
    const agent = call.agent;
    call.agent = null;
    call.pending = [];
    // Let the forwarded `stop` leave before closing; terminate if the handshake never finished.
    if (agent.readyState === WebSocket.OPEN) agent.close(1000);
    else agent.terminate();
  }
  for (const fe of call.frontends) fe.close(1000, 'call ended');
  call.frontends.clear();
}

// --- WS /frontend-stream: listeners of a call's audio ------------------------------------------

function handleFrontend(ws, url) {
  let callSid = url.searchParams.get('callSid');
  let call = null;

  ws.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch (err) {
      console.log(`frontend: bad JSON: ${err.message}`);
      return;
    }
    if (msg.event === 'connect-twilio') {
      callSid = msg.callSid || callSid;
      if (!callSid) return;
      if (call) call.frontends.delete(ws);
      call = getCall(callSid); // may arrive before the call's `start`
      call.frontends.add(ws);
    }
  });

  ws.on('close', () => {
    if (!call) return;
    call.frontends.delete(ws);
    // A placeholder made by an early frontend goes away with its last listener.
    if (!call.caller && call.frontends.size === 0 && calls.get(callSid) === call) calls.delete(callSid);
  });
  ws.on('error', (err) => console.log(`frontend ${callSid}: error: ${err.message}`));
}

// --- start --------------------------------------------------------------------------------------

server.on('error', (err) => {
  console.error(`baseline: ${err.message}`);
  process.exit(1);
});

server.listen(opts.port, opts.host, () => {
  const { address, port } = server.address();
  const host = address.includes(':') ? `[${address}]` : address;
  console.error(`baseline listening on http://${host}:${port}`);
});

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0));
