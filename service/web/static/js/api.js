// The JSON API client: every call sends the stored key, and the API's
// {"error": {"code", "message"}} bodies come back as thrown ApiFailure errors.

export const API = "/api/v1";
// How often the page asks about work still running (an upload's fingerprint, a job).
export const POLL_MS = 500;

// Where the API requires keys, the page keeps one in a cookie (so that page loads and <img>
// thumbnails carry it) and sends it as a bearer header on every API call (the server accepts
// the cookie alone only for reads).
const KEY_COOKIE = "lookalike_key";

export class ApiFailure extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

export function storedKey() {
  const match = document.cookie.match(new RegExp("(?:^|; )" + KEY_COOKIE + "=([^;]*)"));
  return match ? decodeURIComponent(match[1]) : "";
}

export function storeKey(key) {
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; Path=/; SameSite=Strict${secure}`;
}

export const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The raw response to an API path, with the key; a dead connection is an ApiFailure too.
export async function send(path, options = {}) {
  const key = storedKey();
  const sent = key
    ? { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } }
    : options;
  try {
    return await fetch(API + path, sent);
  } catch (_) {
    throw new ApiFailure("network", "", 0);
  }
}

// The JSON body of a successful call; on 401 it asks once for a key and tries again.
export async function api(path, options = {}, retried = false) {
  const response = await send(path, options);
  if (response.status === 401 && !retried) {
    const entered = window.prompt("This Lookalike needs an API key (lk_…):", "");
    if (entered) {
      storeKey(entered.trim());
      return api(path, options, true);
    }
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null; // A proxy's HTML error page, say: reported by status below.
  }
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: "http_error", message: "" };
    throw new ApiFailure(error.code, error.message || "", response.status);
  }
  return body;
}

// A JSON POST (search by a stored image, say).
export function postJson(path, body) {
  return api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
}
