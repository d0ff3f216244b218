// Lookalike's page: native ES modules over the JSON API (/api/v1), no build step. This entry
// module starts the view that the page's <body data-page> names. Module scripts are deferred:
// they run once the document is parsed, so every view finds its elements straight away.

import { browsePage } from "./js/browse.js";
import { $ } from "./js/dom.js";
import { imagePage } from "./js/image.js";
import { jobsView } from "./js/jobs.js";
import { keyForm } from "./js/key.js";
import { searchPage } from "./js/search.js";
import { uploadForm } from "./js/upload.js";

const views = {
  search: searchPage,
  browse: browsePage,
  upload: () => {
    uploadForm();
    jobsView();
  },
};

keyForm();
// The image page is reached from Browse and so carries its tab, but it is a view of its own.
if ($("#detail")) imagePage();
else if (views[document.body.dataset.page]) views[document.body.dataset.page]();
